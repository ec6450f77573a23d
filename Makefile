# fxmerge: every target sets itself up (virtual environment, torch, the package) on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxmerge-installed

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## the main job: train two digit models, merge them with MuDSC, export ONNX, verify, print the table
demo: $(STAMP)
	$(BIN)/python examples/demo.py

## the whole test suite (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check fxmerge tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_infer.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
