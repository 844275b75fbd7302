# Every target does its own set-up: a fresh machine needs only python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test lint typecheck pytest demo bench docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check agclip tests benchmarks examples demo
	$(BIN)/ruff format --check agclip tests benchmarks examples demo

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

# Lint, type checks, then the whole suite on every installed backend.
test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/python -m demo

# Every speed/memory/accuracy/stability benchmark; regenerates docs/benchmarks.md (~25 min).
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# The documentation site (MkDocs + mkdocstrings); --strict turns broken references into errors.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis
