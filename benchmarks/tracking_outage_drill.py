"""Drill (run by hand, not in `make bench`): `train` against a real `mlflow server` on loopback that is killed
mid-epoch for OUTAGE_S seconds (default 180) and restarted on the same port and store, with MLflow's default
HTTP retries. Prints whether training exited 0, how long it took, and whether every epoch's metrics reached
the server.

    python -m benchmarks.tracking_outage_drill            # 3 minutes down
    DRILL_OUTAGE_S=600 python -m benchmarks.tracking_outage_drill
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = int(os.environ.get("DRILL_EPOCHS", "6"))
OUTAGE_S = float(os.environ.get("DRILL_OUTAGE_S", "180"))
CLASSES = ["red", "green", "blue", "grey"]
SIZE = 32


def write_colour_split(path: pathlib.Path, per_class: int, seed: int) -> pathlib.Path:
    """Noise images whose class is a dominant colour channel: a tiny network learns them in a few epochs."""
    from carclf.data.hdf5_dataset import write_hdf5_split
    from carclf_flavor.images import PreprocessSettings

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 80, (len(labels), SIZE, SIZE, 3)).astype(np.uint8)
    for c in range(len(CLASSES)):
        if c < 3:
            images[labels == c, :, :, c] += 150
        else:
            images[labels == c] += 150
    return write_hdf5_split(path, images, labels, CLASSES, PreprocessSettings(image_size=SIZE))


class TrackingServer:
    """`mlflow server` on 127.0.0.1 over a SQLite store, in its own process group (it forks workers)."""

    def __init__(self, folder: pathlib.Path):
        from carclf.compute.ports import free_port

        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "mlflow", "server", "--workers", "1"),
                    *("--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}"),
                    *("--default-artifact-root", str(self.folder / "artifacts"), "--no-serve-artifacts"),
                    *("--host", "127.0.0.1", "--port", str(self.port)),
                ],
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"),
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start in 120 s (log: {self.folder / 'server.log'})")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


def completed_epochs(checkpoints: pathlib.Path) -> int:
    try:
        return json.loads((checkpoints / "latest.json").read_text())["completed_epochs"]
    except (OSError, ValueError, KeyError):
        return 0


def main() -> int:
    from mlflow.tracking import MlflowClient

    work = pathlib.Path(tempfile.mkdtemp(prefix="carclf_outage_drill_"))
    (work / "server").mkdir()
    train = write_colour_split(work / "train.h5", 48, 0)
    val = write_colour_split(work / "val.h5", 8, 1)
    server = TrackingServer(work / "server")
    server.start()
    checkpoints = work / "ckpt"
    argv = [
        *(sys.executable, "-m", "entry_points.train", "--train-data", str(train), "--val-data", str(val)),
        *("--depth", "18", "--width", "0.125", "--weights", "none", "--epochs", str(EPOCHS)),
        *("--head-epochs", "1.0", "--batch-size", "16", "--optimizer", "adam", "--learning-rate", "0.003"),
        *("--online-augment", "false", "--checkpoint-dir", str(checkpoints)),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        MLFLOW_TRACKING_URI=server.uri,
        MLFLOW_REGISTRY_URI=server.uri,
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    print(f"drill: {EPOCHS} epochs, server killed for {OUTAGE_S:.0f} s during epoch 2; work in {work}")
    started = time.monotonic()
    with open(work / "train.stderr", "w") as err:
        training = subprocess.Popen(argv, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=err)
    try:
        while completed_epochs(checkpoints) < 1:
            if training.poll() is not None:
                print(f"drill: training ended before its first epoch (exit {training.returncode})")
                return 1
            time.sleep(0.2)
        server.kill()
        killed_at = time.monotonic()
        print(f"drill: server killed at {killed_at - started:.0f} s, after epoch 1 was checkpointed")
        while time.monotonic() - killed_at < OUTAGE_S and training.poll() is None:
            time.sleep(1)
        epochs_while_down = completed_epochs(checkpoints)
        server.start()
        print(
            f"drill: server back after {time.monotonic() - killed_at:.0f} s; {epochs_while_down} epoch(s) "
            f"checkpointed meanwhile; training {'still running' if training.poll() is None else 'waiting ended'}"
        )
        code = training.wait(timeout=1200)
    finally:
        if training.poll() is None:
            training.kill()
        server.kill()
    elapsed = time.monotonic() - started
    stderr = (work / "train.stderr").read_text()
    state = json.loads((checkpoints / "latest.json").read_text())
    client = MlflowClient(server.uri)
    server.start()
    try:
        steps = {
            key: sorted(m.step for m in client.get_metric_history(state["run_id"], key))
            for key in ("loss", "val_loss", "accuracy")
        }
        status = client.get_run(state["run_id"]).info.status
    finally:
        server.kill()
    complete = all(s == list(range(EPOCHS)) for s in steps.values())
    tracebacks = stderr.count("Traceback")
    print(f"drill: training exit {code} after {elapsed:.0f} s; run {status}; tracebacks in stderr: {tracebacks}")
    print(f"drill: metric steps on the server: {steps}")
    ok = code == 0 and complete and status == "FINISHED" and tracebacks == 0
    print(f"drill: {'PASS' if ok else 'FAIL'}: every epoch's metrics arrived: {complete}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
