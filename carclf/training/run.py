"""One `train` run: checks, the MLflow run (new, `mlflow run`'s, or the resumed one), the two phases, the outputs.

``run_training(config)`` takes the step's config with ``optimizer``/``learning_rate`` already resolved
(``carclf.training.validation.resolved_config``). A run that fails ends FAILED (tag ``carclf.error`` +
``error.txt`` artifact); Ctrl-C ends it KILLED. ``workers > 1`` hands the epochs to
``carclf.training.multi_worker_driver`` and logs the chief's result in the same run. Epoch metrics go through a
``carclf.tracking.outbox.MetricsOutbox``: training rides out a tracking outage; if the server stays away past
``CARCLF_TRACKING_WAIT_S`` at the end, ``TrackingUnavailable`` (one line) leaves the run RUNNING and resumable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import sys
import time
import traceback

from carclf.data.hdf5_dataset import DatasetError
from carclf.data.input_pipeline import HDF5Source, make_dataset
from carclf.tracking.lineage import log_dataset_inputs
from carclf.tracking.outbox import (
    MetricsOutbox,
    TrackingUnavailable,
    forget_active_run,
    send_pending_metrics,
    tracking_wait_s,
    wait_for_tracking,
)
from carclf.tracking.run_owner import claim_run
from carclf.tracking.runs import log_new_params
from carclf.training.checkpoints import (
    config_fingerprint,
    mark_finished,
    plan_resume,
    remove_checkpoints,
    restore_checkpoint,
)
from carclf.training.distributed import StrategyError, make_strategy, replica_batch_size, synchronize_batchnorm
from carclf.training.epoch_tracker import make_epoch_tracker
from carclf.training.model import (
    batchnorm_momentum,
    build_model,
    compile_for_phase,
    one_hot_labels,
    set_batchnorm_momentum,
)
from carclf.training.online_augmentation import AugmentationRanges, augment_in_train_step
from carclf.training.outputs import evaluate_on_test, log_final_model, log_training_curves
from carclf.training.schedule import phases_of
from carclf.training.validation import TrainConfigError, validate, weights_argument

log = logging.getLogger(__name__)

TAG_ERROR = "carclf.error"
TAG_CONFIG = "carclf.train_config_fingerprint"
# How long a failing run waits for its queued epoch metrics to reach the tracking server before it ends.
FAILED_RUN_SEND_WAIT_S = 30.0


def tracked_params(config) -> dict:
    """The parameters logged on the run: every config field but ``resume`` (it does not change the result)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "resume"}


def run_training(config, *, callbacks=(), log_model: bool = True) -> dict:
    """Train, evaluate on ``test_data`` (if given), log and register the model; returns run id, metrics, URI.

    ``callbacks``: extra Keras callbacks for ``fit``, called after the epoch is checkpointed and its
    metrics are queued for MLflow (``tune`` reports to its pruner). ``log_model=False`` (``tune``'s trials, one process): no
    model is logged or registered and the trained Keras model is returned as ``result["model"]``; ``tune``
    logs only its best trial's model, with ``carclf.training.outputs.log_final_model``.
    """
    import mlflow

    try:
        train_source, val_source, test_source = validate(config)
        try:
            tracking_wait_s()
        except ValueError as exc:
            raise TrainConfigError(str(exc)) from None
        checkpoint_dir = pathlib.Path(config.checkpoint_dir).resolve()
        fingerprint = config_fingerprint(config, [train_source, val_source])
        resume_from = plan_resume(config, checkpoint_dir, fingerprint)
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
            end_run_with_error(run_id, "FAILED", str(exc), str(exc))
        raise

    run = start_run(resume_from)
    run_id = run.info.run_id
    try:
        claim_run(run, "train")
        if config.workers > 1:
            from carclf.training.multi_worker_driver import run_multi_worker

            prepare_run(config, run_id, train_source, val_source, test_source, checkpoint_dir, fingerprint, resume_from)
            log_new_params(
                {"num_replicas": config.workers, "per_replica_batch_size": config.batch_size // config.workers}
            )
            result = run_multi_worker(config, run_id, checkpoint_dir, fingerprint, config.spark_master)
        else:
            result = train_in_run(
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
                log_model,
            )
    except TrackingUnavailable:
        forget_active_run()  # the server is away: the run stays RUNNING, for resume=true to continue it
        raise
    except KeyboardInterrupt:
        end_run_with_error(run_id, "KILLED", "interrupted (KeyboardInterrupt)", traceback.format_exc())
        raise
    except BaseException as exc:
        end_run_with_error(run_id, "FAILED", f"{type(exc).__name__}: {exc}".splitlines()[0], traceback.format_exc())
        raise
    mlflow.end_run("FINISHED")
    return result


def start_run(resume_from):
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


def end_run_with_error(run_id: str, status: str, message: str, details: str) -> None:
    """Tag ``carclf.error`` (one line) and artifact ``error.txt`` (the traceback), then end the run ``status``."""
    import mlflow

    try:
        client = mlflow.tracking.MlflowClient()
        client.set_tag(run_id, TAG_ERROR, message[:4000])
        client.log_text(run_id, details, "error.txt")
    finally:
        mlflow.end_run(status=status)


def prepare_run(
    config,
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
        log_new_params(tracked_params(config))
        # Under `mlflow run` optimizer/learning_rate may be logged as given (auto, 0): record what is used.
        log_new_params({"optimizer_used": config.optimizer, "learning_rate_used": config.learning_rate})
        log.info(
            "optimizer %s, learning rate %g (%s weights)",
            config.optimizer,
            config.learning_rate,
            "pretrained" if weights_argument(config.weights) else "no pretrained",
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
        remove_checkpoints(checkpoint_dir)
    else:
        folder, state = resume_from
        completed = int(state["completed_epochs"])
        schedule_state = dict(state.get("schedule") or {})
        client = mlflow.tracking.MlflowClient()
        resumes = int(client.get_run(run_id).data.tags.get("carclf.resume_count", "0")) + 1
        mlflow.set_tags({"carclf.resume_count": str(resumes), "carclf.resumed_from_epoch": str(completed)})
        log.info("resuming run %s after epoch %d from %s", run_id, completed, folder)
    return completed, schedule_state


def train_in_run(
    config,
    run_id: str,
    train_source: HDF5Source,
    val_source: HDF5Source,
    test_source: HDF5Source | None,
    checkpoint_dir: pathlib.Path,
    fingerprint: str,
    resume_from,
    strategy,
    callbacks=(),
    log_model: bool = True,
) -> dict:
    """The single-process training (one device or MirroredStrategy over local GPUs) inside the open run."""
    import keras
    import mlflow

    completed, schedule_state = prepare_run(
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
    outbox = MetricsOutbox(checkpoint_dir)
    scope = strategy.scope()
    scope.__enter__()  # model, optimizers and fit under the strategy (a `with` would re-indent the whole loop)
    try:
        model = build_model(config, train_source.num_classes, train_source.image_size)
        synchronize_batchnorm(model, replicas > 1)
        steps = train_source.steps(config.batch_size)
        momentum = batchnorm_momentum(config, steps)
        set_batchnorm_momentum(model, momentum)
        mlflow.set_tag("carclf.bn_momentum", f"{momentum:.4f}")
        one_hot = one_hot_labels(train_source.num_classes)
        verbose = 1 if sys.stdout.isatty() else 2
        for phase in phases_of(config):
            if completed >= phase.stop:
                continue
            compile_for_phase(model, config, phase.name, phase.base_lr)
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
            tracker = make_epoch_tracker(config, phase, run_id, checkpoint_dir, fingerprint, schedule_state, outbox)
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
        deadline = send_pending_metrics(outbox, checkpoint_dir)
    except TrackingUnavailable:
        raise
    except BaseException:
        # A run that fails keeps the epochs it finished: what is queued goes out (within a bound) before the
        # failure ends the run; what cannot be sent stays in the outbox file for a resume.
        with contextlib.suppress(Exception):  # the training failure is the one to report
            outbox.wait_until_sent(time.monotonic() + min(tracking_wait_s(), FAILED_RUN_SEND_WAIT_S))
        raise
    finally:
        outbox.close()
        scope.__exit__(None, None, None)
        keras.mixed_precision.set_global_policy(previous_policy)

    result = {"run_id": run_id, "metrics": {}, "model_uri": None, "registered_version": None}
    wait_for_tracking(run_id, deadline, checkpoint_dir, "drawing the training curves")
    log_training_curves(run_id)
    if test_source is not None:
        wait_for_tracking(run_id, deadline, checkpoint_dir, "logging the test report")
        result["metrics"] = evaluate_on_test(model, test_source, config.batch_size)
    if log_model:
        wait_for_tracking(run_id, deadline, checkpoint_dir, "logging the model")
        result.update(log_final_model(model, config, train_source, val_source))
    else:
        result["model"] = model
    mark_finished(checkpoint_dir, run_id, fingerprint, config.epochs)
    return result
