"""What `train` accepts: the allowed values, the optimizer defaults by weights, and the checks run before training.

Everything here runs before any MLflow run, model or training exists, so a bad parameter or input file ends the
step with one line naming it (``TrainConfigError`` / ``DatasetError``). The step's parameters themselves are
declared once, in ``entry_points.train.TrainConfig``; the functions here take that config (or any object with
its fields).
"""

from __future__ import annotations

import dataclasses
import pathlib

from carclf.data.input_pipeline import HDF5Source, split_paths
from carclf.training.distributed import STRATEGIES

OPTIMIZERS = ("sgd", "adam")
# ``optimizer=auto`` / ``learning_rate=0`` pick these by the weights. From scratch a ResNet under-trains
# badly with SGD 0.001, which suits ImageNet fine-tuning (sample data, 48 px, ResNet-18 width 0.25, 12
# epochs: test top-1 0.12 with SGD 0.001, 0.50 with Adam 0.003, 0.33 with Adam 0.001).
AUTO_OPTIMIZER = "auto"
FINE_TUNING_DEFAULTS = ("sgd", 0.001)
FROM_SCRATCH_DEFAULTS = ("adam", 0.003)
LR_SCHEDULES = ("cosine", "plateau")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")  # float16: GPUs, with dynamic loss scaling
DEFAULT_CHECKPOINT_DIR = "checkpoints/train"
DEFAULT_SPARK_MASTER = "local[*]"


class TrainConfigError(ValueError):
    """A bad parameter or input, found before any training starts; the message names it."""


def weights_argument(weights):
    """What create_resnet takes for a ``weights`` parameter: None, "imagenet" or a path."""
    text = str(weights).strip()
    if text.lower() in ("", "none", "null", "random"):
        return None
    return "imagenet" if text.lower() == "imagenet" else text


def optimizer_defaults(weights, optimizer: str = AUTO_OPTIMIZER, learning_rate: float = 0.0) -> tuple[str, float]:
    """(optimizer, learning_rate) to use: ``auto`` / 0 become the fine-tuning defaults (pretrained weights)
    or the from-scratch defaults (``weights=none``); explicit values stay."""
    pretrained = str(weights).strip().lower() not in ("", "none", "null", "random")
    default_optimizer, default_lr = FINE_TUNING_DEFAULTS if pretrained else FROM_SCRATCH_DEFAULTS
    optimizer = str(optimizer or AUTO_OPTIMIZER).lower()
    return (
        default_optimizer if optimizer == AUTO_OPTIMIZER else optimizer,
        float(learning_rate) if float(learning_rate or 0) > 0 else default_lr,
    )


def resolved_config(given):
    """``given`` (a TrainConfig) as the training code sees it: ``optimizer=auto`` / ``learning_rate=0``
    resolved (``optimizer_defaults``), paths joined again after splitting, numbers and choices normalised."""
    optimizer, learning_rate = optimizer_defaults(given.weights, given.optimizer, given.learning_rate)
    return dataclasses.replace(
        given,
        train_data=",".join(str(p) for p in split_paths(given.train_data)),
        val_data=",".join(str(p) for p in split_paths(given.val_data)),
        test_data=",".join(str(p) for p in split_paths(given.test_data or "")),
        depth=int(given.depth),
        width=float(given.width),
        epochs=int(given.epochs),
        head_epochs=int(given.head_epochs),
        batch_size=int(given.batch_size),
        learning_rate=float(learning_rate),
        head_learning_rate=float(given.head_learning_rate),
        optimizer=str(optimizer).lower(),
        lr_schedule=str(given.lr_schedule).lower(),
        checkpoint_dir=str(given.checkpoint_dir or DEFAULT_CHECKPOINT_DIR),
        registered_model_name=str(given.registered_model_name or ""),
        strategy=str(given.strategy).lower(),
        spark_master=str(given.spark_master or DEFAULT_SPARK_MASTER),
    )


def validate(config) -> tuple[HDF5Source, HDF5Source, HDF5Source | None]:
    """Check every parameter and input file; raise TrainConfigError / DatasetError with one clear line."""

    def need(condition, message):
        if not condition:
            raise TrainConfigError(message)

    need(config.epochs >= 1, f"epochs must be >= 1, got {config.epochs}")
    need(
        0 <= config.head_epochs <= config.epochs,
        f"head_epochs must be between 0 and epochs ({config.epochs}), got {config.head_epochs}",
    )
    need(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
    need(config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}")
    need(config.head_learning_rate >= 0, f"head_learning_rate must be >= 0, got {config.head_learning_rate}")
    need(config.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    need(config.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {config.lr_schedule!r}")
    need(config.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    need(config.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {config.strategy!r}")
    need(config.workers >= 1, f"workers must be >= 1, got {config.workers}")
    need(
        config.workers == 1 or config.lr_schedule == "cosine",
        f"workers={config.workers} supports lr_schedule=cosine only, got {config.lr_schedule!r}",
    )
    need(
        config.workers == 1 or config.batch_size % config.workers == 0,
        f"batch_size {config.batch_size} (the global batch) does not split over {config.workers} workers",
    )
    need(0.0 <= config.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
    need(0.0 <= config.dropout < 1.0, f"dropout must be in [0, 1), got {config.dropout}")
    need(0.0 <= config.augment_strength <= 2.0, f"augment_strength must be in [0, 2], got {config.augment_strength}")
    need(config.width > 0, f"width must be > 0, got {config.width}")
    need(config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}")
    need(0.0 <= config.bn_momentum < 1.0, f"bn_momentum must be in [0, 1) (0 = auto), got {config.bn_momentum}")
    from carclf_flavor.pretrained import KERAS_APPLICATIONS
    from carclf_flavor.resnet import RESNET_STAGES

    need(config.depth in RESNET_STAGES, f"depth must be one of {sorted(RESNET_STAGES)}, got {config.depth}")
    weights = weights_argument(config.weights)
    if weights == "imagenet":
        need(
            config.depth in KERAS_APPLICATIONS,
            f"weights=imagenet exists only for depth {sorted(KERAS_APPLICATIONS)}, not {config.depth}; use weights=none",
        )
        need(config.width == 1.0, f"weights=imagenet needs width=1.0, got {config.width}")
    elif weights is not None:
        need(
            pathlib.Path(weights).is_file(),
            f"weights: {weights} does not exist (expected imagenet, none or a weights file)",
        )

    need(split_paths(config.train_data), "train_data is empty")
    need(split_paths(config.val_data), "val_data is empty")
    train = HDF5Source.open(config.train_data)
    val = HDF5Source.open(config.val_data)
    test = HDF5Source.open(config.test_data) if split_paths(config.test_data) else None
    from carclf.data.hdf5_dataset import check_compatible

    check_compatible(train.infos + val.infos + (test.infos if test else []))
    need(train.num_images > 0, f"{train.paths[0]}: training set has no images")
    need(val.num_images > 0, f"{val.paths[0]}: validation set has no images")
    from carclf_flavor.resnet import MIN_IMAGE_SIZE

    need(
        train.image_size >= MIN_IMAGE_SIZE,
        f"{train.paths[0]}: images are {train.image_size} px; the ResNet needs >= {MIN_IMAGE_SIZE} px",
    )
    return train, val, test
