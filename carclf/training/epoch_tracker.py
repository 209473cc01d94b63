"""The one Keras callback of `train`'s ``fit``: the epoch's learning rate, its metrics to MLflow, its checkpoint.

No MLflow autolog: each epoch's ``loss``, ``accuracy``, ``top5``, ``val_*``, ``learning_rate`` and
``epoch_seconds`` are logged once, in one batch, at the epoch's global step; then the checkpoint is written, so
a resumed run continues the same metric histories.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time

from carclf.training.checkpoints import KILL_AFTER_EPOCH_ENV, save_checkpoint
from carclf.training.schedule import Phase, cosine_lr, plateau_lr, plateau_update

log = logging.getLogger(__name__)


def make_epoch_tracker(
    config, phase: Phase, run_id: str, checkpoint_dir: pathlib.Path, fingerprint: str, schedule_state: dict
):
    """The callback for one phase's ``fit``; ``schedule_state`` (plateau) is updated in place and checkpointed."""
    import keras
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    class EpochTracker(keras.callbacks.Callback):
        """Sets the epoch's learning rate, logs the epoch's metrics to MLflow once, writes the checkpoint."""

        def __init__(self):
            super().__init__()
            self.client = MlflowClient()
            self.started = time.time()

        def on_epoch_begin(self, epoch, logs=None):
            if config.lr_schedule == "cosine":
                lr = cosine_lr(phase, epoch)
            else:
                lr = plateau_lr(phase, schedule_state)
            self.model.optimizer.learning_rate = lr
            self.current_lr = lr
            self.started = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            values = {k: float(v) for k, v in logs.items() if k != "learning_rate"}
            values["learning_rate"] = float(self.current_lr)
            values["epoch_seconds"] = time.time() - self.started
            timestamp = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, v, timestamp, epoch) for k, v in values.items()])
            if config.lr_schedule == "plateau":
                plateau_update(phase, schedule_state, values.get("val_loss", values.get("loss")))
            state = {
                "completed_epochs": epoch + 1,
                "phase": phase.name,
                "run_id": run_id,
                "config_fingerprint": fingerprint,
                "schedule": dict(schedule_state),
                "finished": False,
            }
            save_checkpoint(checkpoint_dir, self.model, state)
            kill_after = os.environ.get(KILL_AFTER_EPOCH_ENV)
            if kill_after and int(kill_after) == epoch + 1:
                log.warning("%s=%s: simulating a hard kill", KILL_AFTER_EPOCH_ENV, kill_after)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(137)

    return EpochTracker()
