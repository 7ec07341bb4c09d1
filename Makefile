# make demo: set up .venv and run the whole pipeline on generated demo data.
# make test: set up .venv with the dev extra and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Airflow lives in its own environment, as in a deployment: it never imports torch or mlflow
AIRFLOW_VENV ?= .venv-airflow

.PHONY: demo test lint clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	-git rev-parse HEAD > pipeline/COMMIT 2>/dev/null  # lineage for copies of this folder made without .git
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/clickclip demo-data --out data/demo
	$(BIN)/clickclip run --config configs/demo.yaml
	@# exit 3: the gates refused this run, so nothing serves yet (the summary above says why); the demo still ran
	$(BIN)/clickclip search --config configs/demo.yaml "navy rain shell" --k 5 || test $$? -eq 3

# the Kubernetes provider: the DAG's train task can run as a pod (CLICKCLIP_TRAIN_ON=kubernetes)
$(AIRFLOW_VENV)/.installed: Makefile
	test -x $(AIRFLOW_VENV)/bin/pip || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --disable-pip-version-check 'apache-airflow>=3.0,<4' \
		'apache-airflow-providers-cncf-kubernetes>=10'
	touch $@

# the HTML report is checked in a real headless browser: Debian's chromium, installed if missing
# (as root with apt; elsewhere install it yourself, or the browser test is skipped outside CI)
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the HTML report browser test will be skipped"; }

test: $(VENV)/.installed-dev $(AIRFLOW_VENV)/.installed chromium
	$(BIN)/ruff check pipeline tests dags benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check pipeline tests dags benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf runs reports/*/ mlruns state data/demo data/tiny
