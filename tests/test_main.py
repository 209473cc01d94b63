"""`mlflow run .` (entry point main) end to end: child runs, registration, reuse of finished steps, failures."""

import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from conftest import REPO_ROOT
from helpers_flavor import unity_catalog_signature_check

pytestmark = pytest.mark.slow

# Cut down from the defaults (64 px, 20 epochs): the sample data at 32 px for 5 epochs.
SMALL = {"image_size": "32", "epochs": "5", "copies": "1", "spark_master": "local[2]"}


@pytest.fixture(scope="module")
def project_env(tmp_path_factory):
    """One tracking store and experiment (artifacts in tmp, not in the repo) shared by the module's runs."""
    root = tmp_path_factory.mktemp("main")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment_id = MlflowClient(uri).create_experiment("main", artifact_location=str(root / "artifacts"))
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_REGISTRY_URI=uri,
        MLFLOW_EXPERIMENT_ID=experiment_id,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    env.pop("MLFLOW_RUN_ID", None)
    return {"root": root, "uri": uri, "experiment_id": experiment_id, "env": env}


def _mlflow_run(project_env, timeout=900, **overrides):
    params = {"output_dir": str(project_env["root"] / "data"), **SMALL, **overrides}
    cmd = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "run", str(REPO_ROOT), "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=project_env["env"], capture_output=True, text=True, timeout=timeout)


def _runs(project_env):
    client = MlflowClient(project_env["uri"], registry_uri=project_env["uri"])
    return client, client.search_runs([project_env["experiment_id"]], max_results=1000)


def _children(runs, parent_id):
    return {
        r.data.tags.get(mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT): r
        for r in runs
        if r.data.tags.get(mlflow_tags.MLFLOW_PARENT_RUN_ID) == parent_id
    }


@pytest.fixture(scope="module")
def first_run(project_env):
    result = _mlflow_run(project_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_pipeline_runs_steps_as_child_runs_and_registers_the_model(project_env, first_run):
    client, runs = _runs(project_env)
    parents = [r for r in runs if r.data.tags.get(mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT) == "main"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = _children(runs, parent.info.run_id)
    assert set(children) == {"preprocess", "augment", "train", "evaluate"}
    assert all(run.info.status == "FINISHED" for run in children.values())
    # The steps handed their outputs on: train read the augmented file, evaluate the registered model.
    assert children["train"].data.params["train_data"].endswith("train_aug.h5")
    assert children["evaluate"].data.params["model_uri"] == "models:/carclf/1"
    versions = client.search_model_versions("name = 'carclf'")
    assert [v.run_id for v in versions] == [children["train"].info.run_id]
    # Metrics were logged on the steps and summarised on the parent; 10 sample classes: chance is 0.1.
    assert children["train"].data.metrics["test_top1"] > 0.2
    assert parent.data.metrics["evaluate_test_top1"] == children["evaluate"].data.metrics["test_top1"]
    assert children["preprocess"].data.metrics["train_images"] > 0
    # What Unity Catalog's client checks before an upload holds for the model the pipeline registered.
    unity_catalog_signature_check("models:/carclf/1", project_env["uri"])
    assert "mlflow models serve -m models:/carclf/1 --env-manager local -p 5000" in first_run.stdout
    assert "python -m entry_points.score --url http://127.0.0.1:5000" in first_run.stdout


def test_second_run_reuses_finished_steps(project_env, first_run):
    _, before = _runs(project_env)
    result = _mlflow_run(project_env)
    assert result.returncode == 0, result.stderr[-5000:]
    _, after = _runs(project_env)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    # Only the new parent run: every step was reused, none recomputed.
    assert [r.data.tags.get(mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT) for r in new] == ["main"]
    reused = {
        k[len("carclf.reused_run_") :]: v for k, v in new[0].data.tags.items() if k.startswith("carclf.reused_run_")
    }
    assert set(reused) == {"preprocess", "augment", "train", "evaluate"}


def test_changed_parameter_recomputes_from_that_step_on(project_env, first_run):
    _, before = _runs(project_env)
    # A Unity Catalog style three-level name too: train registers it, evaluate reads it back.
    result = _mlflow_run(project_env, epochs="2", registered_model_name="main.default.carclf")
    assert result.returncode == 0, result.stderr[-5000:]
    client, after = _runs(project_env)
    fresh = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    new = {r.data.tags.get(mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT) for r in fresh}
    assert new == {"main", "train", "evaluate"}
    evaluate = next(r for r in fresh if r.data.tags.get(mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT) == "evaluate")
    assert evaluate.data.params["model_uri"] == "models:/main.default.carclf/1"
    assert [str(v.version) for v in client.search_model_versions("name = 'main.default.carclf'")] == ["1"]
    unity_catalog_signature_check("models:/main.default.carclf/1", project_env["uri"])


def test_step_failure_marks_parent_failed_and_names_the_step(project_env, first_run):
    result = _mlflow_run(project_env, ops="crop,warp")
    assert result.returncode != 0
    assert "step 'augment' failed" in result.stderr
    _, runs = _runs(project_env)
    parent = max(
        (r for r in runs if r.data.tags.get(mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT) == "main"),
        key=lambda r: r.info.start_time,
    )
    assert parent.info.status == "FAILED"
    assert "augment" in parent.data.tags["carclf.failed_step"]
    failed_child = _children(runs, parent.info.run_id)["augment"]
    assert failed_child.info.status == "FAILED"


@pytest.mark.parametrize(
    "tracking_uri, expected",
    [
        ("sqlite:////data/runs/mlflow.db", "  mlflow ui --backend-store-uri sqlite:////data/runs/mlflow.db"),
        ("http://127.0.0.1:5005", "  open http://127.0.0.1:5005 (the tracking server's UI)"),
        ("databricks", "  the runs are in databricks: open them in that workspace's UI"),
    ],
)
def test_next_steps_name_the_store_the_runs_went_to(tracking_uri, expected, monkeypatch):
    from entry_points.main import next_commands

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    printed = next_commands("models:/carclf/1", None).splitlines()
    assert printed[-1] == expected
    assert "sqlite:///mlflow.db" not in "\n".join(printed[:-1])
