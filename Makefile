# make demo: set up .venv and run the whole pipeline on generated demo data.
# make test: set up .venv with the dev extra and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/clickclip demo-data --out data/demo
	$(BIN)/clickclip run --config configs/demo.yaml

test: $(VENV)/.installed-dev
	$(BIN)/pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check pipeline tests dags benchmarks

clean:
	rm -rf runs reports/*/ mlruns data/demo data/tiny
