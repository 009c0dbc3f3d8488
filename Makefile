# Quick start: `make test` and `make demo` work on a fresh machine with Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.cellsight-installed

.PHONY: install test demo lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	# the local CPU wheel first: a bare `torch` would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)

test: $(STAMP) lint
	$(VENV)/bin/pytest -n 2 --dist loadfile -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/cellsight demo --out demo_out

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f; done

clean:
	rm -rf $(VENV) demo_out .pytest_cache
