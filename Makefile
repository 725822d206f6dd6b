# One entry point for a newcomer: `make test` and `make demo` each set up everything on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-browser demo bench clean

setup: $(VENV)/.installed

# CPU torch goes in first: otherwise a dependency that asks for torch pulls a multi-GB CUDA build.
# The official `sam2` package is a test-only reference implementation (SAM2 checkpoint parity), installed without deps.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-deps sam2 hydra-core iopath omegaconf antlr4-python3-runtime==4.9.3 portalocker
	touch $@

test: setup
	$(PY) -m pytest -n 2 -q

# The web demo in a real browser: Debian's Chromium (installed here when missing) driven by Playwright's Python API,
# against `maskcma app` and against the exported Space run from a venv without this package (.cache/space-venv,
# built on first use). Never skipped: without Chromium it fails.
CHROMIUM ?= /usr/bin/chromium
test-browser: setup $(VENV)/.browser-installed
	@test -x $(CHROMIUM) || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; } \
		|| { echo "test-browser: Chromium is missing at $(CHROMIUM) and apt-get could not install it (run as root: apt-get install -y chromium chromium-driver)"; exit 1; }
	@test -x $(CHROMIUM) || { echo "test-browser: still no Chromium at $(CHROMIUM)"; exit 1; }
	MASKCMA_CHROMIUM=$(CHROMIUM) $(PY) -m pytest tests/browser -m browser -n 0 -q -p no:cacheprovider

$(VENV)/.browser-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[test,app,browser]"
	touch $@

demo: setup
	$(VENV)/bin/maskcma demo --output demo_output

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo_output .pytest_cache .cache
