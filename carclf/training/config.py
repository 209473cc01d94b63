"""The `train` step's declaration (``TrainConfig``) and the step function ``train``.

They live in the library, not in ``entry_points/train.py``, because ``tune`` (``carclf.tuning``) samples
``TrainConfig``'s fields and runs trials through ``train``; library code never imports ``entry_points``.
``entry_points/train.py`` re-exports both and adds the CLI.
"""

from __future__ import annotations

import dataclasses

from carclf.cli.step_config import param, resolve_config
from carclf.training.distributed import STRATEGIES
from carclf.training.run import run_training
from carclf.training.validation import (
    AUTO_OPTIMIZER,
    DEFAULT_CHECKPOINT_DIR,
    DEFAULT_SPARK_MASTER,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    resolved_config,
)


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
    for ``fit``, called after the epoch is checkpointed and its metrics queued (``tune`` reports to its pruner).
    ``log_model=False`` (``tune``'s trials): no model is logged or registered, the trained Keras model is
    returned as ``result["model"]`` (see ``carclf.training.run.run_training``).
    """
    config = resolved_config(resolve_config(TrainConfig, config, **overrides))
    return run_training(config, callbacks=callbacks, log_model=log_model)
