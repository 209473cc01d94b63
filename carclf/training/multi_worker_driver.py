"""`train -P workers=N`, the driver side: N training processes under MultiWorkerMirroredStrategy, gang-started
by Spark and watched until they end. What each process runs is ``carclf.training.multi_worker_process``.

Launcher: a Spark barrier stage of N tasks (``spark.range(N, numPartitions=N).mapInPandas(..., barrier=True)``:
a DataFrame, so it runs on Spark Connect too, where RDDs do not exist), on ``spark_master`` as in ``augment``
(``local[N]`` here, a cluster, Databricks, or ``sc://host:port``). Barrier tasks start together or not at
all and fail together. Each task picks a free port on its host, all tasks exchange ``host:port`` with
``BarrierTaskContext.allGather``, and each starts ONE fresh Python process with ``TF_CONFIG`` (collective ops
must be configured before TensorFlow runs any op, so the worker cannot be the Spark Python worker itself).
The child dies with its task (PR_SET_PDEATHSIG): a task that Spark kills leaves no process or port behind.

A worker that fails makes its task fail; Spark then fails the stage (and kills the other tasks) and the
driver raises ``WorkerFailed`` with one line: which worker, and its error.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

from carclf.compute.ports import free_port
from carclf.compute.process_lifetime import end_with_parent
from carclf.training import multi_worker_process
from carclf.training.multi_worker_process import (
    ERROR_FILE_ENV,
    RESULT_FILE_ENV,
    SPEC_ENV,
    TEST_DUMP_WEIGHTS_ENV,
    TEST_EXIT_WORKER_ENV,
)

log = logging.getLogger(__name__)

ERROR_MARK = "CARCLF_WORKER_ERROR"
LOOPBACK_NO_PROXY = "127.0.0.1,localhost,::1"
RESULT_SCHEMA = "result string"


class WorkerFailed(RuntimeError):
    """A training worker failed; the message names it and its error."""


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
    port = free_port(host)
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
            **{ERROR_FILE_ENV: str(error_file), RESULT_FILE_ENV: str(result_file)},
            PYTHONPATH=_child_pythonpath(json.loads(spec)["pythonpath"]),
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        env.update(json.loads(spec)["test_env"])
        env[SPEC_ENV] = spec
        child = subprocess.Popen(
            [sys.executable, "-m", multi_worker_process.__name__],
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
