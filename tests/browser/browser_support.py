"""Helpers of the real-browser tests: starting and stopping the app servers, the Space's venv, Chromium's flags."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("MASKCMA_CHROMIUM", "/usr/bin/chromium")
SPACE_VENV = Path(os.environ.get("MASKCMA_SPACE_VENV", REPO_ROOT / ".cache" / "space-venv"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
SERVER_START_TIMEOUT = 300  # seconds: importing torch + transformers + gradio on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(
        f"the server did not answer on {url} within {SERVER_START_TIMEOUT} s:\n{log.read_text()[-4000:]}"
    )


def start_server(command: list[str], env: dict, log: Path, port: int) -> subprocess.Popen:
    handle = log.open("w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    try:
        wait_for_server(process, f"http://127.0.0.1:{port}/", log)
    except BaseException:
        process.kill()
        process.wait(30)
        raise
    return process


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def server_env(tmp: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}
    env.update(
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        HF_MODULES_CACHE=str(tmp / "modules"),
        GRADIO_TEMP_DIR=str(tmp / "gradio"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def ensure_space_venv(requirements: Path) -> Path:
    """A venv with the Space's requirements and gradio, without this package: created with `python -m venv`, CPU
    torch first (from the local wheels, as `make setup` does), then the rest from PyPI; reused while the
    requirements are the same (their hash is stored in the venv)."""
    import gradio

    wanted = requirements.read_text() + f"gradio=={gradio.__version__}\n"
    stamp = SPACE_VENV / ".requirements-sha256"
    digest = hashlib.sha256(wanted.encode()).hexdigest()
    python = SPACE_VENV / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == digest and python.is_file():
        return python
    if SPACE_VENV.exists():
        shutil.rmtree(SPACE_VENV)
    base_python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    subprocess.run([base_python, "-m", "venv", str(SPACE_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    torch_line = next(line for line in requirements.read_text().splitlines() if line.startswith("torch=="))
    subprocess.run([*pip, torch_line], check=True)
    subprocess.run([*pip, "-r", str(requirements), f"gradio=={gradio.__version__}"], check=True)
    check = subprocess.run([str(python), "-c", "import transformers_maskcma"], capture_output=True)
    if check.returncode == 0:
        raise RuntimeError(f"the Space venv {SPACE_VENV} has transformers_maskcma installed; it must not")
    stamp.write_text(digest)
    return python
