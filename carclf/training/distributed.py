"""Which devices ``train`` uses: one, every GPU of the machine (MirroredStrategy), or many machines.

``strategy``:
- ``auto``: MirroredStrategy over all local GPUs when there are several, else one device (today's path);
- ``one``: the default strategy (one device: the first GPU if any, else the CPU);
- ``mirrored``: MirroredStrategy over all local GPUs (NCCL all-reduce), or over all logical CPU devices when
  there is no GPU (tests split the CPU in two with ``tf.config.set_logical_device_configuration``);
- ``multi_worker``: MultiWorkerMirroredStrategy from ``TF_CONFIG`` (set by ``carclf.training.multi_worker_driver``'s
  Spark barrier launcher), RING collectives on CPUs, NCCL on GPUs.

``batch_size`` is always the GLOBAL batch: each of R replicas computes ``batch_size / R`` images per step and
the gradients are all-reduced, so a run on 4 GPUs takes the same optimizer steps as one on 1 GPU. With more
than one replica the BatchNormalization layers are synchronized (batch statistics over the global batch),
so the replicated step computes what the one-device step computes, and the moving statistics agree.
"""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "one", "mirrored", "multi_worker")


class StrategyError(ValueError):
    """The requested strategy cannot run here; the message says why."""


def resolve_strategy_name(name: str) -> str:
    import tensorflow as tf

    if name == "auto":
        return "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "one"
    return name


def make_strategy(name: str):
    """A ``tf.distribute`` strategy for ``name`` (see the module docstring)."""
    import tensorflow as tf

    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise StrategyError("strategy=multi_worker needs TF_CONFIG; use workers=N to launch the workers")
        # Physical, not logical devices: listing logical ones starts the runtime, and collectives must be
        # configured before that.
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.NCCL
            if tf.config.list_physical_devices("GPU")
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation)
        )
    name = resolve_strategy_name(name)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "one":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        # NCCL (the default all-reduce) needs GPUs; between CPU devices a plain reduction is exact and cheap.
        return tf.distribute.MirroredStrategy(cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())
    raise StrategyError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def replica_batch_size(global_batch: int, replicas: int) -> int:
    """Images per replica and step; the global batch must split evenly (else replicas would differ)."""
    if global_batch % replicas:
        raise StrategyError(
            f"batch_size {global_batch} does not split over {replicas} replicas; use a multiple of {replicas}"
        )
    return global_batch // replicas


def synchronize_batchnorm(model, synchronized: bool) -> None:
    """BN batch statistics over the global batch (all replicas) while training; off again before saving."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = bool(synchronized)


def task_of_tf_config() -> tuple[str, int]:
    """(type, index) of this process in TF_CONFIG; ("chief", 0) without one."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    return str(task.get("type", "chief")), int(task.get("index", 0))


def is_chief() -> bool:
    kind, index = task_of_tf_config()
    return kind == "chief" or (kind == "worker" and index == 0)
