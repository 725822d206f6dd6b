# One entry point for a newcomer: `make test` and `make demo` each set up everything on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo bench clean

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

demo: setup
	$(VENV)/bin/maskcma demo --output demo_output

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo_output .pytest_cache
