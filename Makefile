# Two commands do all the set-up (README): `make demo` and `make test`.
# Each creates .venv on first use and is idempotent afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard kernels/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch 2.13.0 first: it is the CPU build (a newer or unpinned torch pulls CUDA wheels).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opd-fast demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
