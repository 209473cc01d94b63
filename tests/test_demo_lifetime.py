"""`mlflow run . -e demo` terminated: the demo server it started stops too, and its port is free again."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import carclf_flavor
from carclf.compute.ports import AddressInUse, check_address_free, free_port
from carclf.deployment.local_server import wait_until_serving
from carclf_flavor.images import PreprocessSettings
from conftest import REPO_ROOT
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet

START_TIMEOUT_S = 240


def _children(pid: int) -> list[int]:
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _descendants(pid: int) -> list[int]:
    try:
        children = _children(pid)
    except FileNotFoundError:
        return []
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _running(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_sigterm_to_mlflow_run_stops_the_demo(tmp_path, mlflow_store):
    model = tmp_path / "model"
    carclf_flavor.save_model(
        build_tiny_resnet(),
        model,
        CLASS_NAMES,
        preprocessing=PreprocessSettings(image_size=IMAGE_SIZE),
        inference_precision="float32",
    )
    port = free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # `mlflow run` starts `python` by name: this venv's.
        "PATH": os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    mlflow_cli = str(pathlib.Path(sys.executable).with_name("mlflow"))
    argv = [mlflow_cli, "run", str(REPO_ROOT), "-e", "demo", "--env-manager", "local"]
    argv += ["-P", f"model_uri={model}", "-P", f"port={port}"]
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    try:
        problem = wait_until_serving(launcher, f"http://127.0.0.1:{port}", START_TIMEOUT_S)
        assert problem is None, f"{problem}:\n{log_path.read_text(errors='replace')[-3000:]}"
        servers = _descendants(launcher.pid)
        assert servers, "the demo runs in a child of `mlflow run`"

        launcher.send_signal(signal.SIGTERM)  # `mlflow run` alone, as a service manager or `kill` would
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in servers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in servers if _running(pid)]
        assert not left, f"still running after `mlflow run` ended: {left}\n{log_path.read_text(errors='replace')}"
        try:
            check_address_free("127.0.0.1", port)
        except AddressInUse as exc:
            pytest.fail(f"the demo's port is still held: {exc}")
        # uvicorn's own shutdown ran (the SIGTERM reached its handler), not a kill mid-request.
        assert "Finished server process" in log_path.read_text(errors="replace")
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait(timeout=30)
