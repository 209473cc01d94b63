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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import time
import traceback
import warnings

import numpy as np

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import config_from_args, param, resolve_config
from carclf.data.hdf5_dataset import DatasetError
from carclf.data.input_pipeline import HDF5Source, make_dataset, split_paths
from carclf.files.atomic import partial_path, remove_stale_partials, write_json_atomic
from carclf.files.fingerprint import files_identity
from carclf.tracking.runs import log_new_params
from carclf.training.distributed import (
    STRATEGIES,
    StrategyError,
    make_strategy,
    replica_batch_size,
    synchronize_batchnorm,
)
from carclf.training.online_augmentation import AugmentationRanges, augment_in_train_step

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
# ``optimizer=auto`` / ``learning_rate=0`` pick these by the weights. From scratch a ResNet under-trains
# badly with SGD 0.001, which suits ImageNet fine-tuning (sample data, 48 px, ResNet-18 width 0.25, 12
# epochs: test top-1 0.12 with SGD 0.001, 0.50 with Adam 0.003, 0.33 with Adam 0.001).
AUTO_OPTIMIZER = "auto"
FINE_TUNING_DEFAULTS = ("sgd", 0.001)
FROM_SCRATCH_DEFAULTS = ("adam", 0.003)
LR_SCHEDULES = ("cosine", "plateau")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")  # float16: GPUs, with dynamic loss scaling
PLATEAU_PATIENCE = 2
PLATEAU_FACTOR = 0.2
PLATEAU_MIN_DELTA = 1e-4
# Tests simulate a hard kill (os._exit) right after the checkpoint of this (1-based) epoch count.
KILL_AFTER_EPOCH_ENV = "CARCLF_TEST_KILL_AFTER_EPOCH"
CHECKPOINT_POINTER = "latest.json"
KEEP_CHECKPOINTS = 2
DEFAULT_CHECKPOINT_DIR = "checkpoints/train"
CALIBRATION_IMAGES = 256  # training images the int8 network is calibrated on (stratified by class)
TAG_ERROR = "carclf.error"
TAG_CONFIG = "carclf.train_config_fingerprint"


class TrainConfigError(ValueError):
    """A bad parameter or input, found before any training starts; the message names it."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train` step's parameters (carclf.cli.step_config: each default written once, here).

    ``optimizer=auto`` and ``learning_rate=0`` are resolved by ``train`` (``optimizer_defaults``) before the
    config reaches the training code, which always sees the values used.
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
    spark_master: str = param("local[*]", "Spark master that runs the workers (workers > 1)")

    @property
    def effective_head_learning_rate(self) -> float:
        return self.head_learning_rate if self.head_learning_rate > 0 else 10.0 * self.learning_rate

    @property
    def weights_argument(self):
        """What build_resnet takes: None, "imagenet" or a path."""
        text = str(self.weights).strip()
        if text.lower() in ("", "none", "null", "random"):
            return None
        return "imagenet" if text.lower() == "imagenet" else text

    def tracked_params(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "resume"}


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


# --------------------------------------------------------------------------------------------------
# Validation (no run, no model, no training yet)
# --------------------------------------------------------------------------------------------------
def validate(config: TrainConfig) -> tuple[HDF5Source, HDF5Source, HDF5Source | None]:
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
    from carclf_flavor.resnet import KERAS_APPLICATIONS, RESNET_STAGES

    need(config.depth in RESNET_STAGES, f"depth must be one of {sorted(RESNET_STAGES)}, got {config.depth}")
    weights = config.weights_argument
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


# --------------------------------------------------------------------------------------------------
# Lineage
# --------------------------------------------------------------------------------------------------
def file_sha256(path, chunk_size: int = 8 << 20) -> str:
    """Content hash, streamed in 8 MiB chunks (memory stays flat; ~1 s per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def log_dataset_inputs(source: HDF5Source, context: str) -> None:
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for index, info in enumerate(source.infos):
        path = info.path.resolve()
        digest = file_sha256(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are local files
            dataset_source = resolve_dataset_source(path.as_uri())
        dataset = MetaDataset(source=dataset_source, name=path.name, digest=digest[:20])
        mlflow.log_input(
            dataset,
            context=context,
            tags={"sha256": digest, "num_images": str(info.num_images), "image_size": str(info.image_size)},
        )
        suffix = f".{index}" if len(source.infos) > 1 else ""
        mlflow.set_tags(
            {f"carclf.data.{context}{suffix}.path": str(path), f"carclf.data.{context}{suffix}.sha256": digest}
        )


def config_fingerprint(config: TrainConfig, sources) -> str:
    relevant = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k
        not in ("resume", "checkpoint_dir", "registered_model_name", "test_data", "strategy", "workers", "spark_master")
    }
    relevant["data"] = [files_identity(s.paths) for s in sources]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# --------------------------------------------------------------------------------------------------
def build_model(config: TrainConfig, num_classes: int, image_size: int):
    """The network exactly as ``train`` builds it (same seed -> same initial weights)."""
    import keras

    from carclf_flavor.resnet import build_resnet

    keras.utils.set_random_seed(int(config.seed))
    return build_resnet(
        depth=config.depth,
        num_classes=num_classes,
        image_size=image_size,
        weights=config.weights_argument,
        dropout=config.dropout,
        width=config.width,
    )


def batchnorm_momentum(config: TrainConfig, steps_per_epoch: int) -> float:
    """BN moving-average momentum: ``bn_momentum``, or (0 = auto) a window of about one epoch's steps,
    between 0.9 and Keras' 0.99. With 0.99 and a small set (a few steps per epoch) the moving statistics
    lag far behind the weights and validation/test accuracy collapse although training accuracy is high."""
    if config.bn_momentum > 0:
        return float(config.bn_momentum)
    return float(min(0.99, max(0.9, 1.0 - 1.0 / max(1, steps_per_epoch))))


def _set_batchnorm_momentum(model, momentum: float) -> None:
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def _make_optimizer(config: TrainConfig, learning_rate: float):
    import keras

    kwargs = {"weight_decay": config.weight_decay} if config.weight_decay > 0 else {}
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=config.momentum, nesterov=True, **kwargs)
    return keras.optimizers.Adam(learning_rate, **kwargs)


def _compile(model, config: TrainConfig, phase: str, learning_rate: float):
    import keras

    from carclf_flavor.resnet import backbone_trainable

    backbone_trainable(model, phase == "full")
    model.compile(
        optimizer=_make_optimizer(config, learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"),
        ],
    )
    model.optimizer.build(model.trainable_variables)


@dataclasses.dataclass
class Phase:
    name: str  # "head" or "full"
    start: int  # first epoch (0-based, global)
    stop: int  # one past the last epoch
    base_lr: float


def phases_of(config: TrainConfig) -> list[Phase]:
    out = []
    if config.head_epochs > 0:
        out.append(Phase("head", 0, config.head_epochs, config.effective_head_learning_rate))
    if config.epochs > config.head_epochs:
        out.append(Phase("full", config.head_epochs, config.epochs, config.learning_rate))
    return out


def cosine_lr(phase: Phase, epoch: int) -> float:
    """Cosine decay per epoch within the phase; the last epoch still gets a small non-zero rate."""
    length = max(1, phase.stop - phase.start)
    return phase.base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - phase.start) / length))


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def save_checkpoint(directory: pathlib.Path, model, state: dict) -> pathlib.Path:
    """Write weights + optimizer + state to ``epoch-NNNN`` (temp name, renamed when complete), then point
    ``latest.json`` at it; older checkpoints beyond the last ``KEEP_CHECKPOINTS`` are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{state['completed_epochs']:04d}"
    final = directory / name
    tmp = partial_path(final)
    remove_stale_partials(directory, log)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_weights(str(tmp / "model.weights.h5"))
    store = {}
    model.optimizer.save_own_variables(store)
    np.savez(tmp / "optimizer.npz", **{f"v{k}": np.asarray(v) for k, v in store.items()})
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
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
    model.load_weights(str(folder / "model.weights.h5"))
    if state.get("phase") == phase.name and state["completed_epochs"] < phase.stop:
        with np.load(folder / "optimizer.npz") as saved:
            store = {key[1:]: saved[key] for key in saved.files}
        model.optimizer.load_own_variables(store)


# --------------------------------------------------------------------------------------------------
# The one tracking callback
# --------------------------------------------------------------------------------------------------
def _make_tracker(
    config: TrainConfig, phase: Phase, run_id: str, checkpoint_dir: pathlib.Path, fingerprint: str, schedule_state: dict
):
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
                if schedule_state.get("phase") != phase.name:  # a new phase starts from its own base rate
                    schedule_state.clear()
                    schedule_state.update(phase=phase.name, lr=phase.base_lr)
                lr = schedule_state["lr"]
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
                self._plateau(values.get("val_loss", values.get("loss")))
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

        def _plateau(self, monitored):
            best = schedule_state.get("best")
            if best is None or monitored < best - PLATEAU_MIN_DELTA:
                schedule_state.update(best=monitored, wait=0)
                return
            schedule_state["wait"] = schedule_state.get("wait", 0) + 1
            if schedule_state["wait"] >= PLATEAU_PATIENCE:
                schedule_state["lr"] = max(schedule_state["lr"] * PLATEAU_FACTOR, phase.base_lr * 1e-3)
                schedule_state["wait"] = 0

    return EpochTracker()


# --------------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------------
def _one_hot(num_classes: int):
    import tensorflow as tf

    def convert(images, labels):
        return images, tf.one_hot(labels, num_classes, dtype=tf.float32)

    return convert


def _plan_resume(config: TrainConfig, checkpoint_dir: pathlib.Path, fingerprint: str):
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
    except Exception:
        log.warning("checkpoint run %s is not in this tracking store: starting fresh", state["run_id"])
        return None
    return folder, state


def _start_run(resume_from):
    """Attach to the checkpoint's run when resuming, otherwise to MLflow's run (mlflow run) or a new one."""
    import mlflow

    if resume_from is None:
        return mlflow.active_run() or mlflow.start_run()
    old_run_id = resume_from[1]["run_id"]
    active = mlflow.active_run()
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if active is not None and active.info.run_id != old_run_id:
        raise TrainConfigError(
            f"a checkpoint of run {old_run_id} exists but run {active.info.run_id} is active; end it first"
        )
    if launcher and launcher != old_run_id:
        # `mlflow run` made a fresh run for this process; the training continues in the original one.
        mlflow.tracking.MlflowClient().set_tag(launcher, "carclf.resumed_into_run", old_run_id)
    return active or mlflow.start_run(run_id=old_run_id)


def _end_run_with_error(run_id: str, status: str, message: str, details: str) -> None:
    import mlflow

    try:
        client = mlflow.tracking.MlflowClient()
        client.set_tag(run_id, TAG_ERROR, message[:4000])
        client.log_text(run_id, details, "error.txt")
    finally:
        mlflow.end_run(status=status)


def train(config: TrainConfig | None = None, *, callbacks=(), **overrides) -> dict:
    """Train, evaluate on ``test_data`` (if given), log and register the model; returns run id, metrics, URI.

    ``optimizer=auto`` / ``learning_rate=0``: see ``optimizer_defaults``. ``callbacks``: extra Keras callbacks
    for ``fit``, called after the epoch's metrics are logged and checkpointed (``tune`` reports to its pruner).
    """
    given = resolve_config(TrainConfig, config, **overrides)
    optimizer, learning_rate = optimizer_defaults(given.weights, given.optimizer, given.learning_rate)
    config = dataclasses.replace(
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
        spark_master=str(given.spark_master or "local[*]"),
    )
    import mlflow

    try:
        train_source, val_source, test_source = validate(config)
        checkpoint_dir = pathlib.Path(config.checkpoint_dir).resolve()
        fingerprint = config_fingerprint(config, [train_source, val_source])
        resume_from = _plan_resume(config, checkpoint_dir, fingerprint)
        strategy = None
        if config.workers == 1:  # workers > 1: each worker process makes its MultiWorkerMirroredStrategy
            strategy = make_strategy(config.strategy)
            replica_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    except (TrainConfigError, DatasetError, StrategyError) as exc:
        # Under `mlflow run` the run exists already: record why it stops.
        run_id = os.environ.get("MLFLOW_RUN_ID") or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
        if run_id:
            if mlflow.active_run() is None:
                mlflow.start_run(run_id=run_id)
            _end_run_with_error(run_id, "FAILED", str(exc), str(exc))
        raise

    run = _start_run(resume_from)
    run_id = run.info.run_id
    try:
        if config.workers > 1:
            from carclf.training.multi_worker import run_multi_worker

            _prepare_run(
                config, run_id, train_source, val_source, test_source, checkpoint_dir, fingerprint, resume_from
            )
            log_new_params(
                {"num_replicas": config.workers, "per_replica_batch_size": config.batch_size // config.workers}
            )
            result = run_multi_worker(config, run_id, checkpoint_dir, fingerprint, config.spark_master)
        else:
            result = _train_in_run(
                config,
                run_id,
                train_source,
                val_source,
                test_source,
                checkpoint_dir,
                fingerprint,
                resume_from,
                strategy,
                callbacks,
            )
    except KeyboardInterrupt:
        _end_run_with_error(run_id, "KILLED", "interrupted (KeyboardInterrupt)", traceback.format_exc())
        raise
    except BaseException as exc:
        _end_run_with_error(run_id, "FAILED", f"{type(exc).__name__}: {exc}".splitlines()[0], traceback.format_exc())
        raise
    mlflow.end_run("FINISHED")
    return result


def _prepare_run(
    config: TrainConfig,
    run_id: str,
    train_source: HDF5Source,
    val_source: HDF5Source,
    test_source: HDF5Source | None,
    checkpoint_dir: pathlib.Path,
    fingerprint: str,
    resume_from,
) -> tuple[int, dict]:
    """Parameters, lineage and stale-checkpoint cleanup of a fresh run, or the resume tags; (completed, schedule)."""
    import mlflow

    completed = 0
    schedule_state: dict = {}
    if resume_from is None:
        log_new_params(config.tracked_params())
        # Under `mlflow run` optimizer/learning_rate may be logged as given (auto, 0): record what is used.
        log_new_params({"optimizer_used": config.optimizer, "learning_rate_used": config.learning_rate})
        log.info(
            "optimizer %s, learning rate %g (%s weights)",
            config.optimizer,
            config.learning_rate,
            "pretrained" if config.weights_argument else "no pretrained",
        )
        log_new_params(
            {
                "num_classes": train_source.num_classes,
                "image_size": train_source.image_size,
                "train_images": train_source.num_images,
                "val_images": val_source.num_images,
                "test_images": test_source.num_images if test_source else 0,
            }
        )
        mlflow.set_tags({TAG_CONFIG: fingerprint, "carclf.checkpoint_dir": str(checkpoint_dir)})
        log_dataset_inputs(train_source, "training")
        log_dataset_inputs(val_source, "validation")
        if test_source is not None:
            log_dataset_inputs(test_source, "testing")
        if checkpoint_dir.exists():
            # A stale checkpoint (finished run or other parameters) must not be picked up later.
            for stale in [*checkpoint_dir.glob("epoch-*"), checkpoint_dir / CHECKPOINT_POINTER]:
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    else:
        folder, state = resume_from
        completed = int(state["completed_epochs"])
        schedule_state = dict(state.get("schedule") or {})
        client = mlflow.tracking.MlflowClient()
        resumes = int(client.get_run(run_id).data.tags.get("carclf.resume_count", "0")) + 1
        mlflow.set_tags({"carclf.resume_count": str(resumes), "carclf.resumed_from_epoch": str(completed)})
        log.info("resuming run %s after epoch %d from %s", run_id, completed, folder)
    return completed, schedule_state


def _train_in_run(
    config: TrainConfig,
    run_id: str,
    train_source: HDF5Source,
    val_source: HDF5Source,
    test_source: HDF5Source | None,
    checkpoint_dir: pathlib.Path,
    fingerprint: str,
    resume_from,
    strategy,
    callbacks=(),
) -> dict:
    import keras
    import mlflow

    completed, schedule_state = _prepare_run(
        config, run_id, train_source, val_source, test_source, checkpoint_dir, fingerprint, resume_from
    )
    previous_policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(config.precision)
    replicas = strategy.num_replicas_in_sync
    per_replica = replica_batch_size(config.batch_size, replicas)
    log.info(
        "strategy %s: %d replica(s), global batch %d = %d per replica",
        type(strategy).__name__,
        replicas,
        config.batch_size,
        per_replica,
    )
    log_new_params({"num_replicas": replicas, "per_replica_batch_size": per_replica})
    scope = strategy.scope()
    scope.__enter__()  # model, optimizers and fit under the strategy (a `with` would re-indent the whole loop)
    try:
        model = build_model(config, train_source.num_classes, train_source.image_size)
        synchronize_batchnorm(model, replicas > 1)
        steps = train_source.steps(config.batch_size)
        momentum = batchnorm_momentum(config, steps)
        _set_batchnorm_momentum(model, momentum)
        mlflow.set_tag("carclf.bn_momentum", f"{momentum:.4f}")
        one_hot = _one_hot(train_source.num_classes)
        verbose = 1 if sys.stdout.isatty() else 2
        for phase in phases_of(config):
            if completed >= phase.stop:
                continue
            _compile(model, config, phase.name, phase.base_lr)
            if config.online_augment:
                # In the training step (on the accelerator), not in tf.data on the CPU; never in the saved model.
                augment_in_train_step(
                    model,
                    seed=config.seed,
                    salt=0 if phase.name == "head" else 1,
                    ranges=AugmentationRanges.for_strength(config.augment_strength),
                )
            if resume_from is not None:
                restore_checkpoint(resume_from[0], model, resume_from[1], phase)
                resume_from = None
            start = max(completed, phase.start)
            log.info(
                "phase %s: epochs %d..%d (%s backbone)",
                phase.name,
                start + 1,
                phase.stop,
                "frozen" if phase.name == "head" else "trainable",
            )
            train_ds = make_dataset(
                train_source,
                config.batch_size,
                shuffle=True,
                seed=config.seed,
                start_epoch=start,
                epochs=phase.stop - start,
            ).map(one_hot)
            val_ds = make_dataset(val_source, config.batch_size, shuffle=False, epochs=1).map(one_hot)
            tracker = _make_tracker(config, phase, run_id, checkpoint_dir, fingerprint, schedule_state)
            model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=phase.stop,
                initial_epoch=start,
                steps_per_epoch=steps,
                callbacks=[tracker, *callbacks],
                verbose=verbose,
                shuffle=False,
            )
            completed = phase.stop
        if resume_from is not None:  # every epoch was done before the kill: only the weights are needed
            model.load_weights(str(resume_from[0] / "model.weights.h5"))
        synchronize_batchnorm(model, False)
    finally:
        scope.__exit__(None, None, None)
        keras.mixed_precision.set_global_policy(previous_policy)

    result = {"run_id": run_id, "metrics": {}, "model_uri": None, "registered_version": None}
    _log_training_curves(run_id)
    if test_source is not None:
        result["metrics"] = _evaluate_on_test(model, test_source, config.batch_size)
    result.update(_log_final_model(model, config, train_source, val_source))
    state = {
        "completed_epochs": config.epochs,
        "run_id": run_id,
        "config_fingerprint": fingerprint,
        "finished": True,
        "checkpoint": "",
    }
    if checkpoint_dir.exists():
        write_json_atomic(checkpoint_dir / CHECKPOINT_POINTER, state)
    return result


def _log_training_curves(run_id: str) -> None:
    import mlflow

    from carclf.reporting.reports import _pyplot, plot_training_curves

    client = mlflow.tracking.MlflowClient()
    history = {}
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "top5", "val_top5", "learning_rate"):
        history[key] = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    figure = plot_training_curves(history)
    mlflow.log_figure(figure, "plots/training_curves.png")
    _pyplot().close(figure)


def _evaluate_on_test(model, test_source: HDF5Source, batch_size: int) -> dict:
    import tensorflow as tf

    from carclf.reporting.reports import collect_predictions, format_table, log_test_report

    forward = tf.function(lambda images: tf.cast(model(images, training=False), tf.float32))
    predictions = collect_predictions(lambda images: forward(images).numpy(), test_source, batch_size)
    metrics = log_test_report(predictions, test_source, list(test_source.class_names))
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(format_table(scalars))
    return scalars


def stratified_sample(source: HDF5Source, count: int, seed: int = 0) -> np.ndarray:
    """About ``count`` images of ``source``, the same number from every class (int8 calibration)."""
    import h5py

    labels = []
    for path in source.paths:
        with h5py.File(path, "r") as handle:
            labels.append(handle["labels"][:])
    labels = np.concatenate(labels)
    rng = np.random.default_rng(seed)
    per_class = max(1, count // source.num_classes)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(source.num_classes)]
    return source.read_rows(np.sort(np.concatenate(picked)))[0]


def _log_final_model(model, config: TrainConfig, train_source: HDF5Source, val_source: HDF5Source) -> dict:
    import mlflow

    import carclf_flavor

    # int8 (issue 18): quantized on a few hundred training images, shipped only if it holds up on validation.
    info = carclf_flavor.log_model(
        model,
        "model",
        list(train_source.class_names),
        preprocessing=train_source.settings,
        registered_model_name=config.registered_model_name or None,
        calibration_data=stratified_sample(train_source, CALIBRATION_IMAGES),
        validation_data=val_source.read_rows(np.arange(val_source.num_images)),
    )
    version = getattr(info, "registered_model_version", None)
    mlflow.set_tag("carclf.model_uri", info.model_uri)
    return {
        "model_uri": info.model_uri,
        "run_model_uri": f"runs:/{mlflow.active_run().info.run_id}/model",
        "registered_version": str(version) if version is not None else None,
    }


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
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
