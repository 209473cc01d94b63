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


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> pathlib.Path:
    """A SQLite store with MLflow's tables made once per session: MLflow's migrations take about a second a
    store, and most tests open one."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-mlflow-store") / "mlflow.db"
    cwd = os.getcwd()
    os.chdir(path.parent)  # MLflow makes ./mlruns beside the store: not in the repository
    try:
        MlflowClient(f"sqlite:///{path}").search_experiments()
    finally:
        os.chdir(cwd)
    return path


def copy_empty_mlflow_store(template: pathlib.Path, path: pathlib.Path, artifact_root: pathlib.Path) -> None:
    """``template`` at ``path``, as MLflow would have made it there: its Default experiment's artifacts under
    ``artifact_root`` (MLflow's ./mlruns, resolved when the store is made)."""
    import shutil
    import sqlite3

    shutil.copyfile(template, path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (str(artifact_root / "0"),))
    db.close()


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch, empty_mlflow_store):
    """Each test tracks into its own SQLite store and artifact folder, never the user's ./mlflow.db."""
    store = tmp_path / "mlstore"
    store.mkdir()
    copy_empty_mlflow_store(empty_mlflow_store, store / "mlflow.db", tmp_path / "mlruns")
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
