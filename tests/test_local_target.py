"""The `carclf-local` deployment target: real `mlflow models serve` processes on 127.0.0.1, driven through
the `mlflow deployments` CLI and the Python client, and the deploy entry point against it."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from carclf.deployment import local_target
from carclf.deployment.process_group import group_members
from conftest import REPO_ROOT
from helpers_deploy import kill_servers_of_store, register_version_model, tiny_jpeg


@pytest.fixture(autouse=True)
def reap_servers(mlflow_store):
    """Whatever a test leaves running (even after a failed assertion) is killed, process group and all."""
    yield
    kill_servers_of_store(mlflow_store)


@pytest.fixture
def deploy_home():
    return pathlib.Path(os.environ["CARCLF_DEPLOY_HOME"])


def _cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlflow", "deployments", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result.stdout


def _group_alive(pid: int) -> bool:
    return bool(group_members(pid))


def _wait_gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            return True
        time.sleep(0.2)
    return False


def test_lifecycle_through_mlflow_deployments_cli(tmp_path, deploy_home):
    v1 = register_version_model(tmp_path, "vm", "one")
    v2 = register_version_model(tmp_path, "vm", "two")
    image = tiny_jpeg(seed=1)
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"image": [base64.b64encode(image).decode("ascii")]}))

    out = _ok(_cli("create", "-t", "carclf-local", "--name", "cars", "-m", v1))
    assert "python_function deployment cars is created" in out
    record = json.loads((deploy_home / "cars.json").read_text())
    assert record["model_uri"] == v1 and record["model_version"] == "1"
    first_pid = record["pid"]
    # The server outlives the CLI process that created it.
    assert _group_alive(first_pid)

    predictions = json.loads(_ok(_cli("predict", "-t", "carclf-local", "--name", "cars", "--input-path", str(request))))
    assert predictions["predictions"] == [{"version": "one", "n_bytes": len(image)}]

    out = _ok(_cli("update", "-t", "carclf-local", "--name", "cars", "-m", v2))
    assert "Deployment cars is updated" in out
    record = json.loads((deploy_home / "cars.json").read_text())
    assert record["model_uri"] == v2 and record["previous_model_uri"] == v1
    assert record["pid"] != first_pid
    assert _wait_gone(first_pid), "the blue server must be stopped once the green one serves"

    predictions = json.loads(_ok(_cli("predict", "-t", "carclf-local", "--name", "cars", "--input-path", str(request))))
    assert predictions["predictions"][0]["version"] == "two"

    # A failed update (this version's model raises while loading) leaves the running deployment alone.
    broken = register_version_model(tmp_path, "vm", "three", broken=True)
    client = local_target.CarclfLocalDeploymentClient("carclf-local")
    with pytest.raises(MlflowException, match="fails to load") as failure:
        client.update_deployment("cars", model_uri=broken, config={"startup_timeout": "120"})
    assert "failed to start" in failure.value.message
    assert json.loads((deploy_home / "cars.json").read_text())["pid"] == record["pid"]
    still = client.predict("cars", pd.DataFrame({"image": [image]}))
    assert still.get_predictions()["version"].tolist() == ["two"]
    assert [d["status"] for d in client.list_deployments()] == ["healthy"]

    # Kill the server by its recorded pid: get must say so, not pretend it runs.
    os.kill(record["pid"], signal.SIGKILL)
    assert _wait_gone(record["pid"])
    out = _ok(_cli("get", "-t", "carclf-local", "--name", "cars"))
    assert "status: unhealthy" in out and "not running" in out
    with pytest.raises(MlflowException, match="not running"):
        client.predict("cars", pd.DataFrame({"image": [image]}))

    out = _ok(_cli("delete", "-t", "carclf-local", "--name", "cars"))
    assert "Deployment cars is deleted" in out
    assert not (deploy_home / "cars.json").exists()
    assert client.list_deployments() == []
    # Deleting again is not an error (MLflow's contract: deletion is idempotent).
    client.delete_deployment("cars")
    assert not (deploy_home / ".cars.lock").exists()  # nothing of the deployment is left


def test_failed_create_reports_log_tail_and_leaves_nothing(tmp_path, deploy_home):
    broken = register_version_model(tmp_path, "bm", "x", broken=True)
    client = local_target.CarclfLocalDeploymentClient("carclf-local")
    with pytest.raises(MlflowException) as failure:
        client.create_deployment("cars", broken)
    message = failure.value.message
    assert "failed to start" in message and "fails to load" in message  # the server's own log tail
    assert not (deploy_home / "cars.json").exists() and not (deploy_home / ".cars.lock").exists()
    assert client.list_deployments() == []
    with pytest.raises(MlflowException, match="no deployment named"):
        client.get_deployment("cars")


def test_the_lock_file_lives_as_long_as_the_record(tmp_path):
    from carclf.deployment.local_state import StateStore

    store = StateStore(tmp_path / "home")
    lock = store.home / ".cars.lock"
    with store.lock("cars"):
        assert lock.exists()
        store.write({"name": "cars", "pid": 0})
    assert lock.exists()  # the record exists: the lock stays for its next update
    with store.lock("cars"):
        store.remove("cars")
    assert not lock.exists() and not store.path("cars").exists()
    with store.lock("ghost"):  # deleting a name that has no record
        pass
    assert sorted(p.name for p in store.home.iterdir()) == ["logs"]


def test_missing_model_and_wrong_flavor_fail_before_any_server_starts(deploy_home):
    client = local_target.CarclfLocalDeploymentClient("carclf-local")
    with pytest.raises(MlflowException, match="cannot load model models:/nope/1"):
        client.create_deployment("cars", "models:/nope/1")
    with pytest.raises(MlflowException, match="python_function flavor only"):
        client.create_deployment("cars", "models:/nope/1", flavor="keras")
    assert not deploy_home.exists() or not list(deploy_home.glob("*.json"))


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "-dash", "x" * 64, "sp ace", "a\x00b"])
def test_names_are_validated(name, tmp_path, deploy_home):
    client = local_target.CarclfLocalDeploymentClient("carclf-local")
    for call in (
        lambda: client.create_deployment(name, "models:/m/1"),
        lambda: client.get_deployment(name),
        lambda: client.delete_deployment(name),
        lambda: client.update_deployment(name, "models:/m/1"),
    ):
        with pytest.raises(MlflowException, match="invalid deployment name"):
            call()
    assert not (tmp_path / "escape.json").exists() and not (tmp_path / "escape").exists()


def test_config_is_validated():
    assert local_target.parse_config({"port": "5001.0", "workers": "2", "host": "::1"}) == {
        "port": 5001,
        "workers": 2,
        "host": "::1",
    }
    with pytest.raises(MlflowException, match="unknown config key"):
        local_target.parse_config({"prot": "5001"})
    with pytest.raises(MlflowException, match="port=70000 must be between 1 and 65535"):
        local_target.parse_config({"port": "70000"})
    with pytest.raises(MlflowException, match="workers='two' is not an integer"):
        local_target.parse_config({"workers": "two"})


def test_deploy_step_names_the_target_as_the_plugin_does():
    from carclf.deployment import targets

    # targets keeps its own copy of the name so that the deploy CLI starts without importing MLflow.
    assert targets.LOCAL_TARGET == local_target.TARGET_NAME
    assert (
        "mlflow"
        not in subprocess.run(
            [sys.executable, "-c", "import sys, entry_points.deploy; print(' '.join(sys.modules))"],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
        ).stdout.split()
    )


def test_state_folder_from_target_uri_and_config(tmp_path):
    by_uri = local_target.CarclfLocalDeploymentClient(f"carclf-local:{tmp_path / 'a'}")
    assert by_uri._store().home == (tmp_path / "a").resolve()
    assert by_uri._store({"home": str(tmp_path / "b")}).home == (tmp_path / "b").resolve()
    assert (
        local_target.CarclfLocalDeploymentClient("carclf-local")._store().home
        == pathlib.Path(os.environ["CARCLF_DEPLOY_HOME"]).resolve()
    )


def test_deploy_entry_point_against_carclf_local(tmp_path, deploy_home):
    import mlflow

    from entry_points.deploy import deploy

    v1 = register_version_model(tmp_path, "dm", "one")
    v2 = register_version_model(tmp_path, "dm", "two")
    image = tiny_jpeg(seed=2)
    client = local_target.CarclfLocalDeploymentClient("carclf-local")
    try:
        first = deploy(model_uri=v1, target="carclf-local", name="cars", workers=1)
        assert first["action"] == "created" and first["flavor"] == "python_function"
        assert client.predict("cars", pd.DataFrame({"image": [image]})).get_predictions()["version"][0] == "one"

        second = deploy(model_uri=v2, target="carclf-local", name="cars")
        assert second["action"] == "updated"
        answer = client.predict("cars", pd.DataFrame({"image": [image]})).get_predictions()
        assert answer["version"][0] == "two" and answer["n_bytes"][0] == len(image)

        runs = mlflow.search_runs(search_all_experiments=True, order_by=["start_time ASC"])
        assert len(runs) >= 2
        last = mlflow.get_run(runs.iloc[-1]["run_id"])
        assert last.data.params["target"] == "carclf-local" and last.data.params["name"] == "cars"
        assert last.data.params["model_uri"] == v2
        assert last.data.tags["carclf.deploy.action"] == "updated"
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(last.info.run_id, "deploy")}
        assert {"deploy/local.json", "deploy/deployment.json"} <= artifacts
    finally:
        client.delete_deployment("cars")
    assert client.list_deployments() == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["get", "--name", "nope"], "Error: no deployment named 'nope' in "),
        (["get", "--name", "../escape"], "Error: invalid deployment name '../escape'"),
        (["predict", "--name", "nope", "--input-path", "{request}"], "Error: no deployment named 'nope'"),
        (["create", "--name", "cars", "-m", "models:/nope/1"], "Error: cannot load model models:/nope/1"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path, deploy_home):
    """MLflow's deployments CLI has no handler of its own and click shows only ClickExceptions as
    one line; the plugin's errors are both MlflowException and ClickException, so no traceback comes first."""
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"image": [base64.b64encode(tiny_jpeg()).decode("ascii")]}))
    result = _cli(*[a.replace("{request}", str(request)) for a in args], "-t", "carclf-local")
    assert result.returncode == 1, result.stderr
    # A fresh tracking store makes MLflow log its table creation first (INFO lines, not errors).
    lines = [line for line in result.stderr.strip().splitlines() if " INFO mlflow." not in line]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr and not result.stdout.strip()
