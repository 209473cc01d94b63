"""The one Keras callback of `train`'s ``fit``: the epoch's learning rate, its checkpoint, its metrics to MLflow.

No MLflow autolog: each epoch's ``loss``, ``accuracy``, ``top5``, ``val_*``, ``learning_rate`` and
``epoch_seconds`` go to MLflow once, in one batch, at the epoch's global step, so a resumed run continues the
same metric histories. The checkpoint is written first: every epoch whose metrics exist is on disk (a kill in
between loses no epoch). The metrics go through the run's ``MetricsOutbox``: a tracking outage neither stops
nor slows training.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time

from carclf.tracking.outbox import MetricsOutbox
from carclf.training.checkpoints import KILL_AFTER_EPOCH_ENV, save_checkpoint
from carclf.training.schedule import Phase, cosine_lr, plateau_lr, plateau_update

log = logging.getLogger(__name__)


def make_epoch_tracker(
    config,
    phase: Phase,
    run_id: str,
    checkpoint_dir: pathlib.Path,
    fingerprint: str,
    schedule_state: dict,
    outbox: MetricsOutbox,
):
    """The callback for one phase's ``fit``; ``schedule_state`` (plateau) is updated in place and checkpointed."""
    import keras

    class EpochTracker(keras.callbacks.Callback):
        """Sets the epoch's learning rate, writes the checkpoint, queues the epoch's metrics in ``outbox``."""

        def __init__(self):
            super().__init__()
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
            outbox.add(run_id, epoch, values)
            kill_after = os.environ.get(KILL_AFTER_EPOCH_ENV)
            if kill_after and int(kill_after) == epoch + 1:
                log.warning("%s=%s: simulating a hard kill", KILL_AFTER_EPOCH_ENV, kill_after)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(137)

    return EpochTracker()
