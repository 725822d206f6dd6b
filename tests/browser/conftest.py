"""Real-browser tests of the web demo (`make test-browser`): Debian's Chromium driven by Playwright's Python API.

Every test here is marked `browser` (`pytestmark`); `make test` deselects them (`-m "not browser"` in pytest's
options) and `make test-browser` runs them. Nothing is skipped: a missing Chromium or a server that does not start
fails.

Two servers are tested with the same browser steps:

- `package`: `maskcma app --model DIR` from this package;
- `space`: the Space folder that `maskcma export --space` writes, started with `python app.py` from a fresh venv that
  has transformers, torch, gradio and PyAV but not this package (`.cache/space-venv`, created on first use with
  `python -m venv`, reused while the Space's requirements stay the same).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_support import CHROMIUM


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(
            f"Chromium is not at {CHROMIUM}: install it with `apt-get install -y chromium chromium-driver` "
            "(`make test-browser` does) or set MASKCMA_CHROMIUM"
        )
    return CHROMIUM
