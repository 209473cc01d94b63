# Two commands for a fresh machine: `make run` and `make test` (README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: run test test-fast test-mlflow-floor test-mlflow-latest lint bench bench-gpu venv clean mlproject

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

# The second venvs: the core without the Azure extra (the core's promise to Databricks users) on the lowest MLflow
# it supports (Databricks Runtime 18 LTS ML ships 3.8.1) and on the newest installable one. Each runs the flavor,
# serving and training tests (about 4 minutes on 2 cores, plus the install).
MLFLOW_FLOOR  ?= 3.8.1
# The newest that pip can install: mlflow 3.18.0 requires mlflow-tracing==3.18.0, which PyPI does not have.
MLFLOW_LATEST ?= 3.17.2
VENV_FLOOR    := .venv-mlflow-floor
VENV_LATEST   := .venv-mlflow-latest
SECOND_VENV_TESTS := tests/test_project_frame.py tests/test_flavor.py tests/test_serving.py tests/test_train.py \
  tests/test_saved_model_compat.py
# A fresh install of MLflow 3.8 takes libraries released after it that it cannot run with; the floor venv gets
# the older ones a Databricks Runtime ships with that MLflow: its tracking store imports a pool class that
# SQLAlchemy 2.1 removed (guarded from MLflow 3.9), and its scoring server uses FastAPI's `app.route`, which
# Starlette 1.0 removed (MLflow 3.11 declares its routes with `app.get`/`app.post`).
$(VENV_FLOOR)/.installed: SECOND_VENV_PINS = 'mlflow==$(MLFLOW_FLOOR)' 'sqlalchemy<2.1' 'starlette<1'
$(VENV_LATEST)/.installed: SECOND_VENV_PINS = 'mlflow==$(MLFLOW_LATEST)'
$(VENV_FLOOR)/.installed $(VENV_LATEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install --quiet --upgrade pip
	$(@D)/bin/python -m pip install --quiet -e '.[test]' $(SECOND_VENV_PINS)
	touch $@

test-mlflow-floor: $(VENV_FLOOR)/.installed
	CARCLF_EXPECT_MLFLOW=$(MLFLOW_FLOOR) $(VENV_FLOOR)/bin/python -m pytest -m "not slow" $(SECOND_VENV_TESTS)

test-mlflow-latest: $(VENV_LATEST)/.installed
	CARCLF_EXPECT_MLFLOW=$(MLFLOW_LATEST) $(VENV_LATEST)/bin/python -m pytest -m "not slow" $(SECOND_VENV_TESTS)

# MLproject is generated from the steps' configs (entry_points/*Config); tests/test_mlproject.py refuses drift.
mlproject: $(VENV)/.installed
	$(BIN)/python -m carclf.cli.mlproject

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# ResNet-50, 224 px, mixed precision on the visible GPUs (< 8 min); needs `pip install ".[gpu]"` there.
bench-gpu: $(VENV)/.installed
	$(BIN)/python -m benchmarks.bench_gpu

clean:
	rm -rf data mlruns mlflow.db .pytest_cache bench-results $(VENV_FLOOR) $(VENV_LATEST)
