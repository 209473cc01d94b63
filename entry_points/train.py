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

import dataclasses
import logging
import sys

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import config_from_args, param, resolve_config
from carclf.data.hdf5_dataset import DatasetError
from carclf.training.distributed import STRATEGIES, StrategyError
from carclf.training.run import run_training
from carclf.training.validation import (
    AUTO_OPTIMIZER,
    DEFAULT_CHECKPOINT_DIR,
    DEFAULT_SPARK_MASTER,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    TrainConfigError,
    optimizer_defaults,
    resolved_config,
    validate,
)

__all__ = ["TrainConfig", "TrainConfigError", "build_parser", "main", "optimizer_defaults", "train", "validate"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train` step's parameters (carclf.cli.step_config: each default written once, here).

    ``optimizer=auto`` and ``learning_rate=0`` are resolved by ``train`` (``optimizer_defaults``) before the
    config reaches the training code (``carclf.training``), which always sees the values used.
    """

    train_data: str = param(help="HDF5 file(s), comma-separated")
    val_data: str = param(help="HDF5 file(s), comma-separated")
    test_data: str = param("", "HDF5 file(s) scored after training; empty: none")
    depth: int = param(50, "ResNet depth: 18, 34, 50, 101 or 152")
    width: float = param(1.0, "channel width multiplier")
    weights: str = param("imagenet", "imagenet | none | path to a weights file")
    epochs: int = param(30, "epochs of both phases together")
    head_epochs: int = param(3, "epochs of the head phase (backbone frozen)")
    batch_size: int = param(32, "global batch (all replicas together)")
    learning_rate: float = param(0.0, "whole-network phase; 0 = 0.001 with pretrained weights, 0.003 from scratch")
    head_learning_rate: float = param(0.0, "head phase; 0 = 10 x learning rate")
    optimizer: str = param(
        AUTO_OPTIMIZER,
        "auto = sgd with pretrained weights, adam from scratch (weights=none)",
        choices=(AUTO_OPTIMIZER, *OPTIMIZERS),
    )
    momentum: float = param(0.9, "SGD momentum")
    weight_decay: float = param(0.0, "L2 weight decay")
    lr_schedule: str = param("cosine", "learning-rate schedule within each phase", choices=LR_SCHEDULES)
    label_smoothing: float = param(0.1, "label smoothing of the loss")
    online_augment: bool = param(True, "flip, crop-zoom, rotation and colour inside the training step")
    augment_strength: float = param(1.0, "scales the online augmentation (0..2)")
    precision: str = param(
        "float32", "training precision (mixed_float16 with loss scaling, for GPUs)", choices=PRECISIONS
    )
    dropout: float = param(0.0, "dropout before the head")
    bn_momentum: float = param(0.0, "BatchNorm moving-average momentum; 0 = auto (about one epoch, 0.9..0.99)")
    checkpoint_dir: str = param(DEFAULT_CHECKPOINT_DIR, "per-epoch checkpoints (resume from here)")
    resume: bool = param(False, "resume from checkpoint_dir even if parameters differ in ways that allow it")
    registered_model_name: str = param("carclf", "empty: do not register")
    seed: int = param(0, "seed of data order, augmentation and initialisation")
    strategy: str = param("auto", "auto: every local GPU when several, else one device", choices=STRATEGIES)
    workers: int = param(1, "training processes (a Spark barrier stage)")
    spark_master: str = param(DEFAULT_SPARK_MASTER, "Spark master that runs the workers (workers > 1)")


def train(config: TrainConfig | None = None, *, callbacks=(), log_model: bool = True, **overrides) -> dict:
    """Train, evaluate on ``test_data`` (if given), log and register the model; returns run id, metrics, URI.

    ``optimizer=auto`` / ``learning_rate=0``: see ``optimizer_defaults``. ``callbacks``: extra Keras callbacks
    for ``fit``, called after the epoch's metrics are logged and checkpointed (``tune`` reports to its pruner).
    ``log_model=False`` (``tune``'s trials): no model is logged or registered, the trained Keras model is
    returned as ``result["model"]`` (see ``carclf.training.run.run_training``).
    """
    config = resolved_config(resolve_config(TrainConfig, config, **overrides))
    return run_training(config, callbacks=callbacks, log_model=log_model)


def build_parser():
    return build_parser_for(TrainConfig, "python -m entry_points.train", __doc__.splitlines()[0])


def main(argv=None) -> int:
    from carclf.training.multi_worker import WorkerFailed
    from carclf_flavor.resnet import WeightsError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        result = train(config_from_args(TrainConfig, args))
    except (TrainConfigError, DatasetError, StrategyError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the run ended KILLED; rerun with the same checkpoint_dir to resume", file=sys.stderr)
        return 130
    print(
        f"run {result['run_id']}  model {result['model_uri']}"
        + (f"  registered version {result['registered_version']}" if result["registered_version"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
