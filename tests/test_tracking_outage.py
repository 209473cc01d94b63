"""`train` against a real `mlflow server` that stops answering mid-training: stopped (SIGSTOP), killed and
restarted on the same port, or gone for good. MLflow's HTTP retries are cut to a few seconds, so an outage of
10-20 s here is longer than them, as a 10-minute one is with MLflow's defaults."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO_ROOT, copy_empty_mlflow_store
from test_train import _cli_args, _colour_set

EPOCHS = 4
SHORT_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
}
OUTAGE_S = 12


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TrackingServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store; started in its own process group (it forks workers)."""

    def __init__(self, folder: pathlib.Path, template: pathlib.Path):
        folder.mkdir()
        self.folder = folder
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        copy_empty_mlflow_store(template, folder / "mlflow.db", folder / "artifacts")
        self.process = None

    def start(self) -> None:
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server"),
                *("--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}"),
                *("--default-artifact-root", str(self.folder / "artifacts"), "--no-serve-artifacts"),
                *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
            ],
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
        )
        log.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not start in 90 s")

    def signal(self, sig) -> None:
        os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture
def server(tmp_path, empty_mlflow_store):
    tracking = TrackingServer(tmp_path / "server", empty_mlflow_store)
    tracking.start()
    yield tracking
    tracking.kill()


@pytest.fixture
def splits(tmp_path):
    return {"train": str(_colour_set(tmp_path / "train.h5", 12, 0)), "val": str(_colour_set(tmp_path / "val.h5", 4, 1))}


class Training:
    """`python -m entry_points.train` in a subprocess, its output in files (a pipe could fill and block it)."""

    def __init__(self, argv, env, folder: pathlib.Path, name: str):
        self.err_path = folder / f"{name}.stderr"
        with open(folder / f"{name}.stdout", "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(argv, env=env, cwd=folder, stdout=out, stderr=err, text=True)

    def poll(self):
        return self.process.poll()

    def finish(self, timeout=300) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        return code, self.err_path.read_text()


def _start_training(splits, checkpoints, server, tmp_path, *extra, wait_s=120, name="train"):
    env = dict(
        os.environ,
        **SHORT_RETRIES,
        PYTHONPATH=str(REPO_ROOT),
        MLFLOW_TRACKING_URI=server.uri,
        MLFLOW_REGISTRY_URI=server.uri,
        CARCLF_TRACKING_WAIT_S=str(wait_s),
    )
    argv = [sys.executable, "-m", "entry_points.train", *_cli_args(splits, checkpoints, EPOCHS), *extra]
    return Training(argv, env, tmp_path, name)


def _completed_epochs(checkpoints) -> int:
    try:
        return json.loads((checkpoints / "latest.json").read_text())["completed_epochs"]
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for(condition, training, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        if training.poll() is not None:
            raise AssertionError(f"training ended early ({training.poll()}): {training.err_path.read_text()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(server.uri)


def _logged_steps(server, run_id, key="loss"):
    return sorted(m.step for m in _client(server).get_metric_history(run_id, key))


def _check_finished(server, training, checkpoints):
    code, err = training.finish()
    assert code == 0, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    state = json.loads((checkpoints / "latest.json").read_text())
    assert state["finished"] is True and state["completed_epochs"] == EPOCHS
    run = _client(server).get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    for key in ("loss", "accuracy", "val_loss", "learning_rate", "epoch_seconds"):
        assert _logged_steps(server, state["run_id"], key) == list(range(EPOCHS)), key
    assert not (checkpoints / "pending_metrics.jsonl").exists()
    return err


def _pending_steps(checkpoints) -> list[int]:
    try:
        lines = (checkpoints / "pending_metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines]


def _checkpoint_leads_metrics(server, checkpoints):
    """While training runs: every epoch whose metrics are on the server is checkpointed (read in that order)."""
    state_file = checkpoints / "latest.json"
    run_id = json.loads(state_file.read_text())["run_id"]
    steps = _logged_steps(server, run_id)
    assert not steps or _completed_epochs(checkpoints) >= max(steps) + 1, steps


@pytest.mark.slow
def test_training_rides_out_a_stopped_server(splits, server, tmp_path):
    checkpoints = tmp_path / "ckpt"
    training = _start_training(splits, checkpoints, server, tmp_path)
    _wait_for(lambda: _completed_epochs(checkpoints) >= 1, training)
    _checkpoint_leads_metrics(server, checkpoints)
    server.signal(signal.SIGSTOP)  # during epoch 2
    # Training goes on without the server: every epoch is checkpointed while it is stopped, its metrics wait.
    _wait_for(lambda: _completed_epochs(checkpoints) == EPOCHS, training)
    # The last epoch's metrics are queued just after its checkpoint is written.
    _wait_for(lambda: _pending_steps(checkpoints)[-1:] == [EPOCHS - 1], training)
    steps = _pending_steps(checkpoints)
    assert len(steps) >= EPOCHS - 2 and steps == list(range(steps[0], EPOCHS)), steps
    # Stopped past MLflow's retries: an attempt has failed (reported once), later ones keep failing.
    _wait_for(lambda: "unreachable" in training.err_path.read_text(), training)
    time.sleep(OUTAGE_S / 2)
    assert training.poll() is None  # still waiting for the server, well within CARCLF_TRACKING_WAIT_S
    server.signal(signal.SIGCONT)
    err = _check_finished(server, training, checkpoints)
    assert "tracking server back after" in err
    assert err.count("unreachable") == 1 and "Retrying" not in err  # one line for the outage, not one per retry


@pytest.mark.slow
def test_training_rides_out_a_killed_and_restarted_server(splits, server, tmp_path):
    checkpoints = tmp_path / "ckpt"
    training = _start_training(splits, checkpoints, server, tmp_path)
    _wait_for(lambda: _completed_epochs(checkpoints) >= 1, training)
    server.kill()  # during epoch 2
    _wait_for(lambda: _completed_epochs(checkpoints) >= 3, training)
    time.sleep(OUTAGE_S / 2)
    server.start()  # the same port and store
    _checkpoint_leads_metrics(server, checkpoints)
    _check_finished(server, training, checkpoints)


@pytest.mark.slow
def test_server_gone_past_the_wait_ends_in_one_line_and_resume_sends_everything(splits, server, tmp_path):
    checkpoints = tmp_path / "ckpt"
    training = _start_training(splits, checkpoints, server, tmp_path, wait_s=3)
    _wait_for(lambda: _completed_epochs(checkpoints) >= 1, training)
    run_id = json.loads((checkpoints / "latest.json").read_text())["run_id"]
    server.kill()
    code, err = training.finish(timeout=90)  # gives up after CARCLF_TRACKING_WAIT_S, not MLflow's retries
    assert code == 75, err[-4000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-4000:]
    assert server.uri in errors[0] and "CARCLF_TRACKING_WAIT_S=3 s" in errors[0] and "resume=true" in errors[0]
    # Resumable: every epoch checkpointed, its metrics kept on disk.
    state = json.loads((checkpoints / "latest.json").read_text())
    assert state["completed_epochs"] == EPOCHS and not state["finished"] and state["run_id"] == run_id
    pending = [json.loads(line) for line in (checkpoints / "pending_metrics.jsonl").read_text().splitlines()]
    assert {b["run_id"] for b in pending} == {run_id}
    steps = _pending_steps(checkpoints)
    assert len(steps) >= EPOCHS - 1 and steps == list(range(steps[0], EPOCHS)), steps

    # Resuming while the server is still away is refused in one line; the checkpoint stays.
    early = _start_training(splits, checkpoints, server, tmp_path, "--resume", "true", name="early")
    code, err = early.finish()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-4000:]
    assert f"cannot look up its run {run_id}" in errors[0]
    assert _completed_epochs(checkpoints) == EPOCHS and _pending_steps(checkpoints) == steps

    server.start()
    assert _client(server).get_run(run_id).info.status == "RUNNING"
    resumed = _start_training(splits, checkpoints, server, tmp_path, "--resume", "true", name="resume")
    _check_finished(server, resumed, checkpoints)
    assert len(_client(server).search_runs(["0"])) == 1


def test_bad_tracking_wait_is_refused_before_a_run(splits, tmp_path, monkeypatch):
    from entry_points.train import TrainConfigError, train
    from test_train import TINY

    monkeypatch.setenv("CARCLF_TRACKING_WAIT_S", "ten minutes")
    with pytest.raises(TrainConfigError, match="CARCLF_TRACKING_WAIT_S='ten minutes': expected a number of seconds"):
        train(train_data=splits["train"], val_data=splits["val"], epochs=1, head_epochs=0, **TINY)
    from mlflow.tracking import MlflowClient

    assert MlflowClient().search_runs(["0"]) == []  # the test's own store: no run was started
