"""`train`'s per-epoch checkpoints and the decision to resume from one.

A checkpoint is a folder ``checkpoint_dir/epoch-NNNN`` (weights, optimizer state, ``state.json`` with epoch,
phase, schedule state and MLflow run id), written under a partial name and renamed when complete;
``latest.json`` (replaced atomically) points at the last one. A rerun resumes only into the same parameters and
input files (``config_fingerprint``) and only while the checkpoint's run is unfinished and in the tracking store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil

import numpy as np

from carclf.files.atomic import StagedFile, remove_stale_partials, write_json_atomic
from carclf.files.fingerprint import files_identity
from carclf.training.schedule import Phase
from carclf.training.validation import TrainConfigError

log = logging.getLogger(__name__)

CHECKPOINT_POINTER = "latest.json"
KEEP_CHECKPOINTS = 2
# Tests simulate a hard kill (os._exit) right after the checkpoint of this (1-based) epoch count.
KILL_AFTER_EPOCH_ENV = "CARCLF_TEST_KILL_AFTER_EPOCH"
# Parameters that do not change what is trained: a rerun with other values still resumes.
_NOT_IN_FINGERPRINT = (
    "resume",
    "checkpoint_dir",
    "registered_model_name",
    "test_data",
    "strategy",
    "workers",
    "spark_master",
)


def config_fingerprint(config, sources) -> str:
    """Identity of what a checkpoint continues: the training parameters and the input files (names, sizes, times)."""
    relevant = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_FINGERPRINT}
    relevant["data"] = [files_identity(s.paths) for s in sources]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(directory: pathlib.Path, model, state: dict) -> pathlib.Path:
    """Write weights + optimizer + state to ``epoch-NNNN`` (temp name, renamed when complete), then point
    ``latest.json`` at it; older checkpoints beyond the last ``KEEP_CHECKPOINTS`` are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{state['completed_epochs']:04d}"
    final = directory / name
    remove_stale_partials(directory, log)
    # Built on local disk when the folder takes only sequential writes: the weights are HDF5.
    staged = StagedFile(final)
    tmp = staged.work_path
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save_weights(str(tmp / "model.weights.h5"))
        store = {}
        model.optimizer.save_own_variables(store)
        np.savez(tmp / "optimizer.npz", **{f"v{k}": np.asarray(v) for k, v in store.items()})
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    except BaseException:
        staged.discard()
        raise
    staged.publish()
    write_json_atomic(directory / CHECKPOINT_POINTER, {"checkpoint": name, **state})
    for old in sorted(directory.glob("epoch-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_latest_checkpoint(directory: pathlib.Path) -> tuple[pathlib.Path, dict] | None:
    """The last complete checkpoint (folder, state), or None."""
    pointer = directory / CHECKPOINT_POINTER
    if not pointer.is_file():
        return None
    try:
        state = json.loads(pointer.read_text())
    except json.JSONDecodeError:
        return None
    folder = directory / state.get("checkpoint", "")
    if not (folder / "state.json").is_file():
        return None
    return folder, json.loads((folder / "state.json").read_text())


def restore_checkpoint(folder: pathlib.Path, model, state: dict, phase: Phase) -> None:
    """Weights always; the optimizer state only when the checkpoint is in the middle of ``phase``."""
    model.load_weights(str(folder / "model.weights.h5"))
    if state.get("phase") == phase.name and state["completed_epochs"] < phase.stop:
        with np.load(folder / "optimizer.npz") as saved:
            store = {key[1:]: saved[key] for key in saved.files}
        model.optimizer.load_own_variables(store)


def remove_checkpoints(directory: pathlib.Path) -> None:
    """A fresh run's cleanup: a stale checkpoint (finished run or other parameters) must not be picked up later."""
    if directory.exists():
        for stale in [*directory.glob("epoch-*"), directory / CHECKPOINT_POINTER]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def mark_finished(directory: pathlib.Path, run_id: str, fingerprint: str, epochs: int) -> None:
    """Point ``latest.json`` at no checkpoint: the run finished, a rerun starts fresh."""
    state = {
        "completed_epochs": epochs,
        "run_id": run_id,
        "config_fingerprint": fingerprint,
        "finished": True,
        "checkpoint": "",
    }
    if directory.exists():
        write_json_atomic(directory / CHECKPOINT_POINTER, state)


def plan_resume(config, checkpoint_dir: pathlib.Path, fingerprint: str):
    """(folder, state) to continue from, or None for a fresh start."""
    import mlflow

    found = read_latest_checkpoint(checkpoint_dir)
    if found is None:
        if config.resume:
            log.info("resume requested but %s holds no checkpoint: starting fresh", checkpoint_dir)
        return None
    folder, state = found
    if state.get("config_fingerprint") != fingerprint:
        if config.resume:
            raise TrainConfigError(
                f"checkpoint_dir {checkpoint_dir}: its checkpoint was made with other parameters or input files; "
                f"rerun with the original ones or use another checkpoint_dir"
            )
        log.info("%s holds a checkpoint of another configuration: starting fresh", checkpoint_dir)
        return None
    if state.get("finished"):
        if config.resume:
            log.info("the run in %s already finished: starting fresh", checkpoint_dir)
        return None
    try:
        mlflow.tracking.MlflowClient().get_run(state["run_id"])
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            # Unreachable is not absent: starting fresh would throw the checkpoint away.
            raise TrainConfigError(
                f"checkpoint_dir {checkpoint_dir}: cannot look up its run {state['run_id']} on the tracking "
                f"server {mlflow.get_tracking_uri()}: {(str(exc).splitlines() or [''])[0][:300]}"
            ) from None
        log.warning("checkpoint run %s is not in this tracking store: starting fresh", state["run_id"])
        return None
    return folder, state
