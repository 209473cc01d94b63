"""`train`: fine-tune a carclf ResNet on HDF5 splits in two phases, tracked in MLflow, resumable, registered.

Phase 1 (``head_epochs``): backbone frozen (BN in inference mode), only the classification head learns, at
``head_learning_rate`` (default 10 x ``learning_rate``). Phase 2: the whole network at ``learning_rate``.
Defaults by the weights (``optimizer=auto``, ``learning_rate=0``): SGD at 0.001 to fine-tune pretrained
weights, Adam at 0.003 from scratch (``weights=none``); both are logged as ``optimizer_used`` and
``learning_rate_used``.
``epochs`` counts both phases. The learning rate follows ``lr_schedule`` per epoch within each phase
(``cosine`` decay, or ``plateau``: x0.2 after 2 epochs without a better val_loss).

Fault tolerance: after every epoch a checkpoint (weights, optimizer state, epoch, phase, schedule state,
MLflow run id) is written to ``checkpoint_dir/epoch-NNNN`` under a temporary name and renamed when
complete; ``latest.json`` (replaced atomically) points at it. A rerun with the same ``checkpoint_dir`` and
the same parameters (or ``resume=true``) continues from the last complete epoch in the SAME MLflow run.
A run that fails ends FAILED (tag ``carclf.error`` + ``error.txt`` artifact); Ctrl-C ends it KILLED.
A tracking outage does not stop training: each epoch's metrics wait in ``checkpoint_dir/pending_metrics.jsonl``
until the server takes them. If it is still away ``CARCLF_TRACKING_WAIT_S`` seconds (default 600) after the
last epoch, one line says so, exit code 75, the run stays RUNNING and ``resume=true`` continues it later.

Tracking: all parameters; per epoch ``loss``, ``accuracy``, ``top5``, ``val_*`` and ``learning_rate`` (one
callback, no autolog); dataset lineage via ``mlflow.log_input`` (path + sha256 of each file); artifacts
``plots/training_curves.png``, ``evaluation/confusion_matrix.png``, ``evaluation/per_class_accuracy.csv``,
``evaluation/misclassified_gallery.png``; test metrics ``test_top1``, ``test_top5``, ``test_macro_f1``.
The model is logged as ``model`` with ``carclf_flavor.log_model`` and registered as ``registered_model_name``,
with an int8 network calibrated on 256 stratified training images and validated on the validation split.

This module is the step's declaration and CLI only; the training itself is ``carclf.training`` (``run``:
the run; ``validation``, ``model``, ``schedule``, ``checkpoints``, ``epoch_tracker``, ``calibration``,
``outputs``).
"""

from __future__ import annotations

import sys

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import run_step
from carclf.data.hdf5_dataset import DatasetError
from carclf.training.config import TrainConfig, train
from carclf.training.distributed import StrategyError
from carclf.training.validation import TrainConfigError, optimizer_defaults, validate

__all__ = ["TrainConfig", "TrainConfigError", "build_parser", "main", "optimizer_defaults", "train", "validate"]


_PROG = "python -m entry_points.train"


def build_parser():
    return build_parser_for(TrainConfig, _PROG, __doc__.splitlines()[0])


def _print_result(result: dict, config: TrainConfig) -> None:
    registered = result["registered_version"]
    print(
        f"run {result['run_id']}  model {result['model_uri']}"
        + (f"  registered version {registered}" if registered else "")
    )


def main(argv=None) -> int:
    from carclf.tracking.outbox import EXIT_TRACKING_UNAVAILABLE, TrackingUnavailable
    from carclf.training.multi_worker_driver import WorkerFailed
    from carclf_flavor.pretrained import WeightsError

    return run_step(
        train,
        TrainConfig,
        _PROG,
        __doc__.splitlines()[0],
        argv,
        expected_errors=(
            TrainConfigError,
            DatasetError,
            StrategyError,
            WeightsError,
            WorkerFailed,
            TrackingUnavailable,
        ),
        exit_codes={WorkerFailed: 1, TrackingUnavailable: EXIT_TRACKING_UNAVAILABLE},
        print_result=_print_result,
        interrupted_line="the run ended KILLED; rerun with the same checkpoint_dir to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
