# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch (on these dev machines it installs from local disk in seconds;
# a bare `torch` requirement would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test chaos bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/spotbatch demo

test: setup
	$(PY) -m pytest -q

chaos: setup
	$(PY) -m pytest -q tests/chaos

bench: setup
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) spotbatch-demo-output .pytest_cache
