"""An Optuna study of `train` configurations whose trials run as Spark tasks, tracked in MLflow.

Built on MLflow's own pieces: ``mlflow.optuna.storage.MlflowStorage`` keeps the study in the tracking store
(the study is a run, each trial a child run of it) and ``mlflow.pyspark.optuna.study.MlflowSparkStudy`` runs
``parallel`` Spark tasks that each ask the study for trials and tell it their results.

- The study run IS the tune run: ``MlflowStorage`` finds a study by run name, so the tune run is named after
  the study before the study is opened. A rerun with the same ``study_name`` finds the earlier tune run and
  continues in it (the rerun's own run is tagged ``carclf.resumed_into_run``); ``trials`` is the number of
  finished (complete or pruned) trials the study should hold, so finished trials are never repeated and a
  failed one is made up for.
- A trial is one call of ``carclf.training.config.train`` inside the trial's run (the same code as the `train`
  step), with a Keras callback that reports validation top-1 per epoch to the pruner, and TensorFlow limited to
  ``host cores // trials running at once on that host`` threads (logged as ``tf_intra_op_threads``). A trial
  logs no model (``train(log_model=False)``): it keeps its final weights, and only the best trial's model is
  logged, registered and tested after the study (``carclf/tuning/champion.py``). Per-trial lines of progress:
  ``carclf/tuning/progress.py``.
- ``MLFLOW_RUN_ID`` (set by `mlflow run`) is removed before Spark starts and again in each trial: an executor
  that inherited it would make `train` log into, and fail, the tune run.
- A relative ``sqlite:///`` tracking URI is made absolute for the executors. Parallel trials write to SQLite
  from several processes at once; SQLite serialises the writes and each waits (tested with 2 at once).
  Executors on other machines cannot reach a local file: use a tracking server (``http://...``) or Databricks.

Optuna: pinned to 5.0.0. ``MlflowSparkStudy`` (MLflow 3.15) unpacks two values from Optuna's private
``_tell_with_warning``, which returns three since Optuna 4.5; the ``ValueError`` is caught there and the trial
re-read from the storage, which records complete, pruned and failing trials correctly (tests cover a failing
trial). What breaks is a trial that returns NaN or nothing: its warning text is lost and writing the error
file fails the whole Spark task, so the objective here raises instead of returning a non-finite value.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Mapping

from carclf.tuning.champion import save_trial_weights, summarise
from carclf.tuning.progress import TrialProgress, finished_states
from carclf.tuning.search_space import Dimension, describe, sample, with_absolute_paths

log = logging.getLogger(__name__)

DIRECTION_TAG = "optuna.study_direction"
TAG_RESUMED_INTO = "carclf.resumed_into_run"
TAG_STUDY = "carclf.tune.study"
TAG_TRIAL_NUMBER = "carclf.tune.trial_number"
TAG_PRUNED_AFTER = "carclf.tune.pruned_after_epoch"
PRUNERS = ("median", "halving", "none")
CHAMPION_ALIAS = "champion"
# Tests make the trial with this number fail after its first epoch (inside train, through the real path).
FAIL_TRIAL_ENV = "CARCLF_TEST_FAIL_TRIAL"


class TuneError(RuntimeError):
    """The study cannot start or produced nothing usable; the message says why."""


class TrialDiverged(RuntimeError):
    """A trial ended without a finite validation accuracy."""


# --------------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------------
def trials_per_host(spark, parallel: int) -> int:
    """How many trials run at once on one machine: they share its cores. Read through ``spark.conf``, which a
    Spark Connect session has too: a local master's threads, else a cluster executor's task slots."""
    from carclf.compute.spark_session import local_slots, server_conf

    slots = local_slots(server_conf(spark, "spark.master", "") or "")
    if slots is None:
        cores = int(server_conf(spark, "spark.executor.cores", "1"))
        slots = max(1, cores // int(server_conf(spark, "spark.task.cpus", "1")))
    return max(1, min(int(parallel), slots))


def host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def thread_budget(concurrent: int, cpus: int | None = None) -> tuple[int, int]:
    """(intra-op, inter-op) TensorFlow threads for one of ``concurrent`` trials sharing ``cpus`` cores."""
    intra = max(1, (cpus or host_cpus()) // max(1, concurrent))
    return intra, min(2, intra)


def configure_tensorflow_threads(concurrent: int) -> tuple[int, int]:
    """Limit this process's TensorFlow to its share of the cores; returns the threads in force.

    A reused Spark Python worker may have run TensorFlow already (the pools are then fixed): the values in
    force are returned, which are the same budget when the previous task set them."""
    import tensorflow as tf

    intra, inter = thread_budget(concurrent)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        pass
    return (
        tf.config.threading.get_intra_op_parallelism_threads() or host_cpus(),
        tf.config.threading.get_inter_op_parallelism_threads() or host_cpus(),
    )


# --------------------------------------------------------------------------------------------------
# One trial (runs on an executor)
# --------------------------------------------------------------------------------------------------
def make_pruning_callback(trial, fail_trial: int | None = None):
    """A Keras callback: report val top-1 of each epoch to the study's pruner; prune when it says so."""
    import keras
    import optuna

    class ReportToPruner(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.last_value = None

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get("val_accuracy")
            if value is not None:
                self.last_value = float(value)
                if math.isfinite(self.last_value):
                    trial.report(self.last_value, epoch)
            if fail_trial is not None and trial.number == fail_trial:
                raise RuntimeError(f"simulated trial failure ({FAIL_TRIAL_ENV}={fail_trial})")
            if trial.should_prune():
                from mlflow.tracking import MlflowClient

                MlflowClient().set_tag(trial._trial_id, TAG_PRUNED_AFTER, str(epoch + 1))
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} (val top-1 {self.last_value:.4f})")

    return ReportToPruner()


@dataclasses.dataclass
class TrialObjective:
    """The Optuna objective shipped to the executors (pickled): sample, then train in the trial's run."""

    space: Mapping[str, Dimension]
    train_data: str
    val_data: str
    tracking_uri: str
    concurrent_per_host: int
    study_name: str
    # Tests: this trial number fails (FAIL_TRIAL_ENV, read on the driver: a trial's environment is its
    # executor's, e.g. a Connect server's).
    fail_trial: int | None = None

    def __call__(self, trial) -> float:
        import mlflow
        import optuna
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        from carclf.training.config import train

        os.environ.pop("MLFLOW_RUN_ID", None)
        mlflow.set_tracking_uri(self.tracking_uri)
        intra, inter = configure_tensorflow_threads(self.concurrent_per_host)
        params = sample(trial, self.space)
        flush = getattr(trial.storage, "flush_all_batches", None)
        if flush is not None:
            flush()  # the suggested values reach the run before train logs its parameters
        run_id = trial._trial_id
        MlflowClient().log_batch(
            run_id,
            params=[Param("tf_intra_op_threads", str(intra)), Param("tf_inter_op_threads", str(inter))],
            tags=[
                RunTag(TAG_STUDY, self.study_name),
                RunTag(TAG_TRIAL_NUMBER, str(trial.number)),
                RunTag("mlflow.runName", f"{self.study_name}-trial-{trial.number}"),
            ],
        )
        reporter = make_pruning_callback(trial, self.fail_trial)
        checkpoint_dir = tempfile.mkdtemp(prefix=f"carclf-trial-{trial.number}-")
        client = MlflowClient()
        try:
            mlflow.start_run(run_id=run_id)
            result = train(
                train_data=self.train_data,
                val_data=self.val_data,
                test_data="",
                **params,
                checkpoint_dir=checkpoint_dir,
                registered_model_name="",
                callbacks=[reporter],
                log_model=False,
            )
            save_trial_weights(client, run_id, result.get("model"), params, checkpoint_dir)
        except optuna.TrialPruned:
            client.delete_tag(run_id, "carclf.error")  # train recorded the pruning as its error: it is not one
            raise
        finally:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            while mlflow.active_run() is not None:  # train ends its run itself; a failure before it did not
                mlflow.end_run("FAILED")
            # train closed the run (FINISHED / FAILED); Optuna refuses to tell a trial whose run is closed,
            # and it must: it records the value, the pruning or the error and closes the run itself.
            client.update_run(run_id, status="RUNNING")
        value = reporter.last_value
        if value is None or not math.isfinite(value):
            raise TrialDiverged(f"trial {trial.number} ended without a finite val top-1 ({value})")
        return value


# --------------------------------------------------------------------------------------------------
# The study (driver)
# --------------------------------------------------------------------------------------------------
def executor_tracking_uri(uri: str) -> str:
    """The tracking URI as executors must see it: a relative SQLite path made absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(pathlib.Path(uri[len(prefix) :]).resolve())
    if "://" not in uri and not uri.startswith("databricks"):
        return pathlib.Path(uri).resolve().as_uri()
    return uri


def make_pruner(name: str):
    import optuna

    if name == "median":
        # Compare from the third epoch on, once 4 trials have finished: early epochs say little.
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=2)
    return optuna.pruners.NopPruner()


def _mark_orphans_failed(client, trials, why: str) -> None:
    """Trials left RUNNING by a process that died (killed tune, lost executor) end FAILED with the reason."""
    from optuna.trial import TrialState

    for trial in trials:
        if trial.state == TrialState.RUNNING:
            client.set_tag(trial._trial_id, "carclf.error", why)
            client.set_terminated(trial._trial_id, status="FAILED")


def require_maximizing_study(study_class) -> None:
    """The study maximizes val top-1: MlflowSparkStudy takes a direction from MLflow 3.15 on, before which every
    study it creates minimizes. The other steps run on the core's whole MLflow range (3.8.1 up)."""
    import inspect

    import mlflow

    if "direction" not in inspect.signature(study_class.__init__).parameters:
        raise TuneError(
            f"tune needs MLflow >= 3.15.0 (MlflowSparkStudy(direction=...)); this is MLflow {mlflow.__version__}: "
            "pip install 'mlflow>=3.15,<4' (the other steps work on 3.8.1)"
        )


def _open_study_run(client, launcher_id: str, study_name: str) -> tuple[str, bool]:
    """(study run id, resumed): the existing study of that name in the experiment, or the tune run made one."""
    from mlflow.optuna.storage import MlflowStorage

    experiment_id = client.get_run(launcher_id).info.experiment_id
    existing = MlflowStorage(experiment_id=experiment_id).get_study_id_by_name_if_exists(study_name)
    if existing is None or existing == launcher_id:
        client.set_tag(launcher_id, "mlflow.runName", study_name)
        client.set_tag(launcher_id, DIRECTION_TAG, "MAXIMIZE")
        client.set_tag(launcher_id, TAG_STUDY, study_name)
        return launcher_id, False
    run = client.get_run(existing)
    if run.data.tags.get(DIRECTION_TAG) != "MAXIMIZE":
        raise TuneError(
            f"study_name {study_name!r} is the name of run {existing}, which is not a tune study "
            "of this project; choose another study_name"
        )
    client.update_run(existing, status="RUNNING")
    client.set_tag(launcher_id, TAG_RESUMED_INTO, existing)
    return existing, True


def run_study(
    space: Mapping[str, Dimension],
    train_data: str,
    val_data: str,
    test_data: str = "",
    trials: int = 16,
    parallel: int = 4,
    spark_master: str = "local[*]",
    study_name: str = "",
    registered_model_name: str = "carclf",
    pruner: str = "median",
    alias: str = CHAMPION_ALIAS,
) -> dict:
    """Run (or resume) the study; register and evaluate the best trial's model; returns a summary dict."""
    import mlflow
    import optuna
    from mlflow.exceptions import ExecutionException
    from mlflow.optuna.storage import MlflowStorage
    from mlflow.pyspark.optuna.study import MlflowSparkStudy
    from mlflow.tracking import MlflowClient

    from carclf.compute.spark_session import get_spark
    from carclf.data.input_pipeline import absolute_paths
    from carclf.tracking.run_owner import claim_run

    require_maximizing_study(MlflowSparkStudy)
    # The trials run in Spark tasks (a cluster's executors, a Connect server's Python workers) whose working
    # directory is not this one: every path they get is made absolute here, before the study starts.
    train_data, val_data = absolute_paths(train_data), absolute_paths(val_data)
    test_data = absolute_paths(test_data) if test_data else ""
    space = with_absolute_paths(space)
    tracking_uri = executor_tracking_uri(mlflow.get_tracking_uri())
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    # `mlflow run` hands its run over in MLFLOW_RUN_ID: take it, and keep it from the Spark JVM's children.
    launcher_id = os.environ.pop("MLFLOW_RUN_ID", None)
    active = mlflow.active_run()
    if active is not None:
        launcher_id = active.info.run_id
    own_run = launcher_id is None
    if own_run:
        launcher_id = mlflow.start_run().info.run_id
        active = mlflow.active_run()
    study_name = study_name or f"carclf-tune-{launcher_id[:8]}"
    study_run_id, resumed = _open_study_run(client, launcher_id, study_name)
    if active is not None and active.info.run_id != study_run_id:
        if not own_run:
            raise TuneError(
                f"study {study_name!r} lives in run {study_run_id} but run {active.info.run_id} is active; end it first"
            )
        mlflow.end_run("FINISHED")  # our own fresh run only points at the resumed study
    if mlflow.active_run() is None:
        mlflow.start_run(run_id=study_run_id)
    claim_run(mlflow.active_run(), "tune")
    experiment_id = client.get_run(study_run_id).info.experiment_id
    storage = MlflowStorage(experiment_id=experiment_id)

    before = storage.get_all_trials(study_run_id)
    _mark_orphans_failed(client, before, "the trial's process ended before the trial finished (tune stopped?)")
    before = storage.get_all_trials(study_run_id)
    done = sum(1 for t in before if t.state in finished_states())
    remaining = max(0, int(trials) - done)
    if resumed:
        print(
            f"[tune] resuming study {study_name!r} (run {study_run_id}): {done} finished trial(s) kept, "
            f"{remaining} to run",
            flush=True,
        )
    else:
        print(
            f"[tune] study {study_name!r} (run {study_run_id}): {remaining} trial(s); rerun with "
            f"-P study_name={study_name} to resume",
            flush=True,
        )
    mlflow.log_text(describe(space) + "\n", "tune/search_space.txt")

    spark = get_spark(spark_master, app_name="carclf-tune")
    concurrent = trials_per_host(spark, parallel)
    intra, inter = thread_budget(concurrent)
    print(
        f"[tune] up to {parallel} trial(s) at once, {concurrent} per host; TensorFlow threads per trial "
        f"(on a {host_cpus()}-core host): {intra} intra-op, {inter} inter-op",
        flush=True,
    )
    client.set_tag(study_run_id, "carclf.tune.trials_per_host", str(concurrent))
    client.set_tag(study_run_id, "carclf.tune.tf_intra_op_threads", str(intra))

    failed_tasks = None
    if remaining > 0:
        fail = os.environ.get(FAIL_TRIAL_ENV)
        objective = TrialObjective(
            dict(space),
            str(train_data),
            str(val_data),
            tracking_uri,
            concurrent,
            study_name,
            fail_trial=int(fail) if fail else None,
        )
        study = MlflowSparkStudy(
            study_name,
            storage,
            sampler=optuna.samplers.TPESampler(),
            pruner=make_pruner(pruner),
            mlflow_tracking_uri=tracking_uri,
            direction="maximize",
        )
        progress = TrialProgress(experiment_id, study_run_id, int(trials))
        progress.prime(before)
        started = time.perf_counter()
        with progress:
            try:
                study.optimize(objective, n_trials=remaining, n_jobs=min(int(parallel), remaining), catch=(Exception,))
            except ExecutionException as exc:
                # A Spark task died outside a trial (e.g. a lost executor): keep what finished.
                failed_tasks = str(exc).splitlines()[0]
                log.warning("some trials did not run: %s", failed_tasks)
        client.update_run(study_run_id, status="RUNNING")  # MlflowSparkStudy closes it; the summary follows
        mlflow.log_metric("tune_seconds", time.perf_counter() - started)

    all_trials = storage.get_all_trials(study_run_id)
    _mark_orphans_failed(client, all_trials, "the trial's Spark task ended before the trial finished")
    all_trials = storage.get_all_trials(study_run_id)
    return summarise(
        client,
        study_run_id,
        launcher_id,
        study_name,
        all_trials,
        (str(train_data), str(val_data), str(test_data or "")),
        registered_model_name,
        alias,
        failed_tasks,
    )
