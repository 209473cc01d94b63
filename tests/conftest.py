"""Suite-wide guards: no telemetry, no traffic past loopback, a private MLflow store per test."""

import os

# Set before anything imports mlflow: MLflow 3 sends usage telemetry otherwise.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Azure SDKs must never find a cloud here; the deploy tests provide credentials explicitly.
for _var in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)

import pathlib  # noqa: E402
import tempfile  # noqa: E402

# The generated sample dataset is cached per test session, not in the user's ~/.cache.
os.environ["CARCLF_CACHE_DIR"] = tempfile.mkdtemp(prefix="carclf-test-cache-")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch):
    """Each test tracks into its own SQLite store and artifact folder, never the user's ./mlflow.db."""
    store = tmp_path / "mlstore"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("CARCLF_DEPLOY_HOME", str(tmp_path / "deployments"))
    # MLflow puts artifacts of a SQLite store under ./mlruns: keep them out of the repository.
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


# Modules that install a model's requirements into a fresh virtualenv, in the order in which each one's include
# the previous one's (float model, int8 model, int8 model + Azure's server): helpers_flavor.fresh_venv_python
# then adds to the virtualenv already built instead of installing TensorFlow three times. Each stays whole.
FRESH_VENV_MODULES = ("test_serving.py", "test_int8.py", "test_azure_scorer.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return FRESH_VENV_MODULES.index(name) + 1 if name in FRESH_VENV_MODULES else 0

    items.sort(key=rank)  # stable: every other test keeps its place, these three modules run last, in this order
