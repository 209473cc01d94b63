# Two commands for a fresh machine: `make run` and `make test` (README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: run test bench bench-gpu venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The whole pipeline on the bundled sample data, tracked in ./mlflow.db.
run: $(VENV)/.installed
	$(BIN)/mlflow run . --env-manager local $(MLFLOW_RUN_ARGS)

# pytest's own exit code goes through: 5 (no tests collected) fails the target.
test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# ResNet-50, 224 px, mixed precision on the visible GPUs (< 8 min); needs `pip install ".[gpu]"` there.
bench-gpu: $(VENV)/.installed
	$(BIN)/python -m benchmarks.bench_gpu

clean:
	rm -rf data mlruns mlflow.db .pytest_cache bench-results
