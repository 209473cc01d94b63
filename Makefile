# Two commands for a fresh machine: `make run` and `make test` (README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast test-mlflow-latest lint bench bench-gpu venv clean mlproject

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test,azure]'
	touch $@

venv: $(VENV)/.installed

# The whole pipeline on the bundled sample data, tracked in ./mlflow.db.
run: $(VENV)/.installed
	$(BIN)/mlflow run . --env-manager local $(MLFLOW_RUN_ARGS)

# pytest's own exit code goes through: 5 (no tests collected) fails the target.
test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop while developing: everything but the tests marked slow (CI still runs them all).
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff: lint, and the formatting check (configured in pyproject.toml; .pre-commit-config.yaml runs the same).
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The second venv: the newest installable MLflow, no Azure extra (the core's promise to Databricks users).
MLFLOW_LATEST ?= 3.17.2
VENV_LATEST   := .venv-mlflow-latest
$(VENV_LATEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install --quiet -e '.[test]' 'mlflow==$(MLFLOW_LATEST)'
	touch $@

test-mlflow-latest: $(VENV_LATEST)/.installed
	CARCLF_EXPECT_MLFLOW=$(MLFLOW_LATEST) $(VENV_LATEST)/bin/python -m pytest -m "not slow" \
	  tests/test_project_frame.py tests/test_flavor.py tests/test_serving.py tests/test_train.py

# MLproject is generated from the steps' configs (entry_points/*Config); tests/test_mlproject.py refuses drift.
mlproject: $(VENV)/.installed
	$(BIN)/python -m carclf.cli.mlproject

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# ResNet-50, 224 px, mixed precision on the visible GPUs (< 8 min); needs `pip install ".[gpu]"` there.
bench-gpu: $(VENV)/.installed
	$(BIN)/python -m benchmarks.bench_gpu

clean:
	rm -rf data mlruns mlflow.db .pytest_cache bench-results $(VENV_LATEST)
