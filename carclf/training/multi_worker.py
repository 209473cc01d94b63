"""`train -P workers=N`: N training processes under MultiWorkerMirroredStrategy, gang-started by Spark.

Launcher: a Spark barrier stage of N tasks (``spark.range(N, numPartitions=N).mapInPandas(..., barrier=True)``:
a DataFrame, so it runs on Spark Connect too, where RDDs do not exist), on ``spark_master`` as in ``augment``
(``local[N]`` here, a cluster, Databricks, or ``sc://host:port``). Barrier tasks start together or not at
all and fail together. Each task picks a free port on its host, all tasks exchange ``host:port`` with
``BarrierTaskContext.allGather``, and each starts ONE fresh Python process with ``TF_CONFIG`` (collective ops
must be configured before TensorFlow runs any op, so the worker cannot be the Spark Python worker itself).
The child dies with its task (PR_SET_PDEATHSIG): a task that Spark kills leaves no process or port behind.

Worker: Keras 3 ``model.fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so the
worker runs a small loop: ``distribute_datasets_from_function`` (each worker reads only its rows,
``row_sharding``) + ``strategy.run`` + ``optimizer.apply_gradients`` (Keras 3 all-reduces the gradients),
the loss scaled by ``tf.nn.compute_average_loss`` over the GLOBAL batch, BN statistics synchronized over
all workers, the same per-epoch learning rate, phases and augmentation as ``train``. Only the chief
(worker 0) logs to MLflow (the one run the driver made) and writes checkpoints; every worker resumes from
the chief's last checkpoint (``checkpoint_dir`` must be shared storage on a cluster).

A worker that fails makes its task fail; Spark then fails the stage (and kills the other tasks) and the
driver raises ``WorkerFailed`` with one line: which worker, and its error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types

import numpy as np

from carclf.compute.process_lifetime import end_with_parent

log = logging.getLogger(__name__)

ERROR_MARK = "CARCLF_WORKER_ERROR"
SPEC_ENV = "CARCLF_WORKER_SPEC"
# Tests: this worker index exits hard (os._exit(137)) at the first step of its second epoch.
TEST_EXIT_WORKER_ENV = "CARCLF_TEST_EXIT_WORKER"
# Tests: every worker writes its final weights (npz) into this folder.
TEST_DUMP_WEIGHTS_ENV = "CARCLF_TEST_DUMP_WEIGHTS_DIR"
LOOPBACK_NO_PROXY = "127.0.0.1,localhost,::1"
RESULT_SCHEMA = "result string"


class WorkerFailed(RuntimeError):
    """A training worker failed; the message names it and its error."""


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def run_multi_worker(
    config, run_id: str, checkpoint_dir: pathlib.Path, fingerprint: str, spark_master: str = "local[*]"
) -> dict:
    """Train with ``config.workers`` processes; returns the chief's result (as ``train`` returns it)."""
    import mlflow

    from carclf.compute.spark_session import DEFAULT_MASTER, active_session, get_spark, session_master

    workers = int(config.workers)
    if (spark_master or "").strip() == DEFAULT_MASTER and active_session() is None:
        # A barrier stage needs a slot per task: local[*] on a machine with fewer cores than workers would
        # refuse the stage, so give local mode at least one thread per worker.
        spark_master = f"local[{max(workers, os.cpu_count() or 1)}]"
    spark = get_spark(spark_master, app_name="carclf-train")
    spec = json.dumps(
        {
            "config": _config_dict(config),
            "run_id": run_id,
            "checkpoint_dir": str(checkpoint_dir),
            "fingerprint": fingerprint,
            "tracking_uri": mlflow.get_tracking_uri(),
            "registry_uri": mlflow.get_registry_uri(),
            "pythonpath": os.pathsep.join(sys.path),
            # The tests' hooks, read here and handed on: a task's environment is its executor's (a cluster's,
            # a Connect server's), not this process's.
            "test_env": {name: os.environ[name] for name in _test_hooks() if name in os.environ},
        }
    )
    log.info("launching %d training workers in a Spark barrier stage on %s", workers, session_master(spark))
    # A DataFrame, not an RDD: Spark Connect has no RDDs; a barrier mapInPandas runs on both kinds of session.
    tasks = spark.range(workers, numPartitions=workers).mapInPandas(
        _barrier_partition(spec), RESULT_SCHEMA, barrier=True
    )
    try:
        results = [row.result for row in tasks.collect()]
    except Exception as exc:
        from carclf.tracking.outbox import TrackingUnavailable

        line = _worker_error_line(exc)
        marker = f"{TrackingUnavailable.__name__}: "
        if marker in line:  # the chief gave up waiting for the tracking server: resumable, as in one process
            raise TrackingUnavailable(line.split(marker, 1)[1]) from None
        raise WorkerFailed(line) from None
    chief = [json.loads(r) for r in results if json.loads(r).get("chief")]
    return chief[0]["result"]


def _barrier_partition(spec: str):
    """The function of the barrier stage: one row in (the task's number), the worker's result row out."""

    def run(batches):
        import pandas as pd

        for _ in batches:  # the task's one input row: its rank comes from the barrier context
            pass
        for line in _barrier_task(spec):
            yield pd.DataFrame({"result": [line]})

    return run


def _test_hooks() -> tuple[str, ...]:
    from carclf.training.checkpoints import KILL_AFTER_EPOCH_ENV

    return (TEST_EXIT_WORKER_ENV, TEST_DUMP_WEIGHTS_ENV, KILL_AFTER_EPOCH_ENV)


def _config_dict(config) -> dict:
    """The config as the workers get it, its files made absolute here: a worker runs where its Spark task
    runs (a Connect server's Python worker, an executor), whose working directory is not this one."""
    import dataclasses

    from carclf.data.input_pipeline import absolute_paths
    from carclf.training.validation import weights_argument

    out = dataclasses.asdict(config)
    for key in ("train_data", "val_data", "test_data"):
        out[key] = absolute_paths(out[key]) if out[key] else ""
    if weights_argument(out["weights"]) not in (None, "imagenet"):
        out["weights"] = str(pathlib.Path(out["weights"]).absolute())
    return out


def _worker_error_line(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():
        if ERROR_MARK in line:
            return line.split(ERROR_MARK, 1)[1].strip(" :")
    lines = [line for line in text.splitlines() if line.strip()]
    return f"training workers failed: {lines[0] if lines else type(exc).__name__}"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the Spark task's Python worker goes away."""
    end_with_parent(signal.SIGKILL)


def _child_pythonpath(driver_path: str) -> str:
    """The driver's sys.path (a local master: this checkout, the venv), then this task's own entries that it
    lacks: on a cluster or a Spark Connect server the project code shipped to the session is only there."""
    entries = [entry for entry in driver_path.split(os.pathsep) if entry]
    entries += [entry for entry in sys.path if entry and entry not in entries]
    return os.pathsep.join(entries)


def _barrier_task(spec: str):
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    rank = context.partitionId()
    address = context.getTaskInfos()[rank].address
    host = address.rsplit(":", 1)[0] if address else "127.0.0.1"
    if host in ("localhost", "", None):
        host = "127.0.0.1"
    port = _free_port(host)
    cluster = context.allGather(f"{host}:{port}")
    tf_config = {"cluster": {"worker": list(cluster)}, "task": {"type": "worker", "index": rank}}
    with tempfile.TemporaryDirectory(prefix=f"carclf-worker-{rank}-") as tmp:
        error_file, result_file = pathlib.Path(tmp) / "error.txt", pathlib.Path(tmp) / "result.json"
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), LOOPBACK_NO_PROXY, host]))
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(tf_config),
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
            CARCLF_WORKER_ERROR_FILE=str(error_file),
            CARCLF_WORKER_RESULT_FILE=str(result_file),
            PYTHONPATH=_child_pythonpath(json.loads(spec)["pythonpath"]),
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        env.update(json.loads(spec)["test_env"])
        env[SPEC_ENV] = spec
        child = subprocess.Popen(
            [sys.executable, "-m", "carclf.training.multi_worker"],
            env=env,
            preexec_fn=_die_with_parent,
            stdout=sys.stderr,
        )
        try:
            code = child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if code != 0:
            reason = error_file.read_text().strip() if error_file.is_file() else ""
            if not reason:
                reason = (f"killed by signal {-code}" if code < 0 else f"exited with code {code}") + " without an error"
            raise RuntimeError(
                f"{ERROR_MARK}: worker {rank} of {len(cluster)} ({host}, pid {child.pid}) failed: {reason}"
            )
        yield json.dumps({"chief": rank == 0, "result": json.loads(result_file.read_text())})


# --------------------------------------------------------------------------------------------------
# Worker process
# --------------------------------------------------------------------------------------------------
def _sharded_dataset(source, epoch: int, config, context, shuffle: bool = True):
    import tensorflow as tf

    from carclf.data.row_sharding import worker_batches

    size = source.image_size

    def generate():
        for images, labels, _, global_rows in worker_batches(
            source,
            epoch,
            config.seed,
            config.batch_size,
            context.input_pipeline_id,
            context.num_input_pipelines,
            shuffle,
        ):
            yield images, labels, np.int32(global_rows)

    signature = (
        tf.TensorSpec([None, size, size, 3], tf.uint8),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([], tf.int32),
    )
    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(2)


def _make_train_step(strategy, model, optimizer, config, num_classes: int, salt: int):
    import keras
    import tensorflow as tf

    from carclf.training.online_augmentation import AugmentationRanges, augment_images, step_seed

    ranges = AugmentationRanges.for_strength(config.augment_strength)
    loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing, reduction=None)
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_step(images, labels, global_rows):
        if config.online_augment:
            # Seeded by (step, worker): the same sequence after a resume, different images per worker.
            images = augment_images(images, step_seed(config.seed, optimizer.iterations, salt=salt), ranges)
        with tf.GradientTape() as tape:
            probabilities = tf.cast(model(images, training=True), tf.float32)
            per_example = loss_fn(tf.one_hot(labels, num_classes), probabilities)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_rows)
            gradient_loss = optimizer.scale_loss(loss) if scaled else loss
        gradients = tape.gradient(gradient_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(probabilities, -1, output_type=tf.int32), labels), tf.float32)
        )
        return tf.reduce_sum(per_example), correct

    @tf.function
    def train_step(batch):
        loss_sum, correct = strategy.run(replica_step, args=batch)
        return (
            strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
        )

    return train_step


def _validation_metrics(model, source, config, num_classes: int) -> dict:
    import keras
    import tensorflow as tf

    from carclf.data.input_pipeline import make_dataset

    loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing, reduction=None)
    forward = tf.function(lambda images: tf.cast(model(images, training=False), tf.float32))
    total_loss = correct = rows = 0.0
    for images, labels in make_dataset(source, config.batch_size, shuffle=False, epochs=1):
        probabilities = forward(images)
        total_loss += float(tf.reduce_sum(loss_fn(tf.one_hot(labels, num_classes), probabilities)))
        correct += float(
            tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probabilities, -1, output_type=tf.int32), labels), tf.float32))
        )
        rows += int(labels.shape[0])
    return {"val_loss": total_loss / rows, "val_accuracy": correct / rows}


def run_worker(spec: dict) -> dict:
    """One worker's whole training (called in a fresh process with TF_CONFIG set)."""
    import keras

    from carclf.training.checkpoints import (
        KILL_AFTER_EPOCH_ENV,
        read_latest_checkpoint,
        restore_checkpoint,
        save_checkpoint,
    )
    from carclf.training.distributed import make_strategy, synchronize_batchnorm, task_of_tf_config
    from carclf.training.model import batchnorm_momentum, build_model, make_optimizer, set_batchnorm_momentum
    from carclf.training.schedule import cosine_lr, phases_of
    from carclf.training.validation import validate
    from carclf_flavor.resnet import backbone_trainable

    strategy = make_strategy("multi_worker")  # before any other TF op
    _, rank = task_of_tf_config()
    chief = rank == 0
    # The driver's config, field by field (the step's TrainConfig class belongs to the CLI layer, entry_points).
    config = types.SimpleNamespace(**spec["config"])
    train_source, val_source, test_source = validate(config)
    checkpoint_dir = pathlib.Path(spec["checkpoint_dir"])
    run_id = spec["run_id"]
    num_classes = train_source.num_classes

    found = read_latest_checkpoint(checkpoint_dir)
    if found is not None and (
        found[1].get("run_id") != run_id
        or found[1].get("config_fingerprint") != spec["fingerprint"]
        or found[1].get("finished")
    ):
        found = None
    completed = int(found[1]["completed_epochs"]) if found else 0

    outbox = None
    if chief:
        import mlflow

        from carclf.tracking.outbox import MetricsOutbox

        mlflow.set_tracking_uri(spec["tracking_uri"])
        mlflow.set_registry_uri(spec["registry_uri"])
        outbox = MetricsOutbox(checkpoint_dir)

    keras.mixed_precision.set_global_policy(config.precision)
    steps = train_source.steps(config.batch_size)
    with strategy.scope():
        model = build_model(config, num_classes, train_source.image_size)
    synchronize_batchnorm(model, True)
    set_batchnorm_momentum(model, batchnorm_momentum(config, steps))
    exit_worker = os.environ.get(TEST_EXIT_WORKER_ENV)
    history: list[dict] = []
    for phase in phases_of(config):
        if completed >= phase.stop:
            continue
        backbone_trainable(model, phase.name == "full")
        with strategy.scope():
            model.compile(
                optimizer=make_optimizer(config, phase.base_lr),
                loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
            )
            model.optimizer.build(model.trainable_variables)
        if found is not None:
            restore_checkpoint(found[0], model, found[1], phase)
            found = None
        train_step = _make_train_step(
            strategy, model, model.optimizer, config, num_classes, salt=0 if phase.name == "head" else 1
        )
        for epoch in range(max(completed, phase.start), phase.stop):
            started = time.time()
            learning_rate = cosine_lr(phase, epoch)
            model.optimizer.learning_rate = learning_rate
            dataset = strategy.distribute_datasets_from_function(
                lambda context, epoch=epoch: _sharded_dataset(train_source, epoch, config, context)
            )
            total_loss = correct = 0.0
            for _step, batch in enumerate(dataset):
                if exit_worker is not None and int(exit_worker) == rank and epoch >= 1:
                    print(f"worker {rank}: {TEST_EXIT_WORKER_ENV} set, exiting hard", file=sys.stderr, flush=True)
                    os._exit(137)
                loss_sum, right = train_step(batch)
                total_loss += float(loss_sum)
                correct += float(right)
            metrics = {"loss": total_loss / train_source.num_images, "accuracy": correct / train_source.num_images}
            if chief:
                metrics.update(_validation_metrics(model, val_source, config, num_classes))
                metrics.update(learning_rate=float(learning_rate), epoch_seconds=time.time() - started)
                state = {
                    "completed_epochs": epoch + 1,
                    "phase": phase.name,
                    "run_id": run_id,
                    "config_fingerprint": spec["fingerprint"],
                    "schedule": {},
                    "finished": False,
                    "workers": config.workers,
                }
                save_checkpoint(checkpoint_dir, model, state)  # first: an epoch with metrics is on disk
                outbox.add(run_id, epoch, metrics)
                kill_after = os.environ.get(KILL_AFTER_EPOCH_ENV)
                if kill_after and int(kill_after) == epoch + 1:
                    print(
                        f"chief: {KILL_AFTER_EPOCH_ENV}={kill_after}, simulating a hard kill",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(137)
            history.append(metrics)
        completed = phase.stop
    if found is not None:  # every epoch was done before the kill: only the weights are needed
        model.load_weights(str(found[0] / "model.weights.h5"))
    synchronize_batchnorm(model, False)
    dump = os.environ.get(TEST_DUMP_WEIGHTS_ENV)
    if dump:
        np.savez(pathlib.Path(dump) / f"worker-{rank}.npz", *[np.asarray(w) for w in model.get_weights()])
    if not chief:
        return {}
    keras.mixed_precision.set_global_policy("float32")
    try:
        return _finish_on_chief(
            model, config, run_id, train_source, val_source, test_source, checkpoint_dir, spec, outbox
        )
    finally:
        outbox.close()


def _finish_on_chief(
    model, config, run_id, train_source, val_source, test_source, checkpoint_dir, spec, outbox
) -> dict:
    import mlflow

    from carclf.tracking.outbox import send_pending_metrics, wait_for_tracking
    from carclf.training.checkpoints import mark_finished
    from carclf.training.outputs import evaluate_on_test, log_final_model, log_training_curves

    deadline = send_pending_metrics(outbox, checkpoint_dir)
    wait_for_tracking(run_id, deadline, checkpoint_dir, "drawing the training curves")
    mlflow.start_run(run_id=run_id)
    result = {"run_id": run_id, "metrics": {}, "model_uri": None, "registered_version": None}
    log_training_curves(run_id)
    if test_source is not None:
        wait_for_tracking(run_id, deadline, checkpoint_dir, "logging the test report")
        result["metrics"] = evaluate_on_test(model, test_source, config.batch_size)
    wait_for_tracking(run_id, deadline, checkpoint_dir, "logging the model")
    result.update(log_final_model(model, config, train_source, val_source))
    mark_finished(checkpoint_dir, run_id, spec["fingerprint"], config.epochs)
    return result


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:2000]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(os.environ[SPEC_ENV])
    error_file = pathlib.Path(os.environ["CARCLF_WORKER_ERROR_FILE"])
    try:
        result = run_worker(spec)
    except BaseException as exc:  # the one line the driver shows; the traceback goes to this worker's log
        traceback.print_exc()
        error_file.write_text(_first_line(exc))
        return 1
    pathlib.Path(os.environ["CARCLF_WORKER_RESULT_FILE"]).write_text(json.dumps(result))
    # The chief's MLflow run stays open for the driver, which ends it once every worker is done.
    with contextlib.suppress(Exception):
        import mlflow

        if mlflow.active_run() is not None:
            os._exit(0)  # skip MLflow's atexit end_run: the driver owns the run's status
    return 0


if __name__ == "__main__":
    sys.exit(main())
