"""Training's metrics reach the tracking server whenever it is up: an outbox on disk, sent by a background thread.

Training never waits for the server: each epoch's batch is appended to ``pending_metrics.jsonl`` (beside the
checkpoint) and sent from a thread, retried until it lands. A batch leaves the file only once the server has
it, so an outage of any length (a stopped server, one killed and restarted) costs nothing computed, and a
resumed run sends what an earlier process could not. MLflow's asynchronous logging is not used for this: it
drops a batch once MLflow's HTTP retries are spent. Resending a batch is harmless: it carries its original
timestamp, and MLflow's store keeps one row per (key, step, timestamp, value).

The end of training waits for the server at most ``CARCLF_TRACKING_WAIT_S`` seconds in all (default 600):
for the outbox to empty, then before each stage that needs the server (curves, test report, model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import threading
import time

from carclf.files.atomic import write_text_atomic

log = logging.getLogger(__name__)

PENDING_FILE = "pending_metrics.jsonl"
TRACKING_WAIT_ENV = "CARCLF_TRACKING_WAIT_S"
DEFAULT_TRACKING_WAIT_S = 600.0
# Between two attempts once MLflow's own retries of one attempt are spent.
RETRY_PAUSE_S = 2.0
# MLflow error codes that no retry changes (the batch itself is refused): anything else is an outage.
_REFUSALS = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"}
)


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within ``CARCLF_TRACKING_WAIT_S``; the work so far is on disk."""


# EX_TEMPFAIL: nothing is wrong with the input; rerun (resume) once the server is back.
EXIT_TRACKING_UNAVAILABLE = 75


def tracking_wait_s() -> float:
    """``CARCLF_TRACKING_WAIT_S`` as seconds (default 600); a bad value is a one-line ValueError."""
    raw = os.environ.get(TRACKING_WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_TRACKING_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{TRACKING_WAIT_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def unavailable(checkpoint_dir: pathlib.Path, what: str) -> TrackingUnavailable:
    """The one line that ends a training whose tracking server stayed away."""
    return TrackingUnavailable(
        f"tracking server {tracking_uri()} did not answer within {TRACKING_WAIT_ENV}={tracking_wait_s():g} s "
        f"while {what}; the checkpoint and the unsent metrics are in {checkpoint_dir}: once it is back, rerun "
        f"with -P resume=true to continue"
    )


class _QuietRetries(logging.Filter):
    """Drops urllib3's line per HTTP retry from the threads that report an outage themselves, once."""

    threads: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.threads


_QUIET_RETRIES = _QuietRetries()
logging.getLogger("urllib3.connectionpool").addFilter(_QUIET_RETRIES)


@contextlib.contextmanager
def _quiet_retries():
    thread = threading.get_ident()
    _QUIET_RETRIES.threads.add(thread)
    try:
        yield
    finally:
        _QUIET_RETRIES.threads.discard(thread)


def _is_refusal(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in _REFUSALS


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


class MetricsOutbox:
    """Per-step metric batches of one or more runs, kept in ``folder/pending_metrics.jsonl`` until sent.

    Batches a previous process left in the file are sent first (each names its run). ``add`` never blocks on
    the server; ``wait_until_sent`` waits (bounded) for the file to empty; ``close`` stops the sender.
    """

    def __init__(self, folder: pathlib.Path):
        from mlflow.tracking import MlflowClient

        self.path = pathlib.Path(folder) / PENDING_FILE
        self._client = MlflowClient()
        self._changed = threading.Condition()
        self._pending: list[dict] = self._read()
        self._closed = False
        self._down_since: float | None = None
        self._failure: BaseException | None = None
        if self._pending:
            log.info(
                "%d metric batch(es) left unsent by an earlier run are sent from %s", len(self._pending), self.path
            )
        self._sender = threading.Thread(target=self._send_loop, name="carclf-metrics-outbox", daemon=True)
        self._sender.start()

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        batches = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                batches.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line cannot happen (atomic rewrite): say so if it does
                log.warning("%s line %d is not JSON: skipped", self.path, number)
        return batches

    def _write(self) -> None:
        """The file as the pending list is now (called with the lock held); no file when nothing is pending."""
        if self._pending:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, "".join(json.dumps(b, sort_keys=True) + "\n" for b in self._pending))
        else:
            self.path.unlink(missing_ok=True)

    def add(self, run_id: str, step: int, metrics: dict) -> None:
        """Queue one step's metrics (on disk at once); the sender logs them as one batch."""
        batch = {
            "run_id": run_id,
            "step": int(step),
            "timestamp": int(time.time() * 1000),
            "metrics": {k: float(v) for k, v in metrics.items()},
        }
        with self._changed:
            self._pending.append(batch)
            self._write()
            self._changed.notify_all()

    def pending(self) -> int:
        with self._changed:
            return len(self._pending)

    def _send(self, batch: dict) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, batch["timestamp"], batch["step"]) for k, v in sorted(batch["metrics"].items())]
        self._client.log_batch(batch["run_id"], metrics=metrics)

    def _send_loop(self) -> None:
        try:
            with _quiet_retries():
                self._send_until_closed()
        except BaseException as exc:  # e.g. the file cannot be rewritten: the waiting main thread raises it
            with self._changed:
                self._failure = exc
                self._changed.notify_all()

    def _send_until_closed(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                batch = self._pending[0]  # the only consumer: appends go to the end
            attempt_started = time.monotonic()
            try:
                self._send(batch)
            except Exception as exc:
                if _is_refusal(exc):
                    log.warning("run %s refused metrics of step %d, dropped: %s", batch["run_id"], batch["step"], exc)
                else:
                    if self._down_since is None:
                        self._down_since = attempt_started
                        log.warning(
                            "tracking server %s unreachable (%s): training goes on, metrics wait in %s",
                            tracking_uri(),
                            _first_line(exc),
                            self.path,
                        )
                    with self._changed:
                        self._changed.wait(RETRY_PAUSE_S)
                    continue
            if self._down_since is not None:
                log.info(
                    "tracking server back after %.0f s: sending %d pending metric batch(es)",
                    time.monotonic() - self._down_since,
                    self.pending(),
                )
                self._down_since = None
            with self._changed:
                if self._pending and self._pending[0] is batch:
                    self._pending.pop(0)
                    self._write()
                self._changed.notify_all()

    def wait_until_sent(self, deadline: float) -> bool:
        """True once every batch is on the server; False at ``deadline`` (``time.monotonic()``)."""
        with self._changed:
            while self._pending:
                if self._failure is not None:
                    raise self._failure
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def close(self) -> None:
        """Stop the sender (an attempt under way finishes in the background); what is unsent stays in the file."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


def wait_for_server(run_id: str, deadline: float) -> bool:
    """True as soon as the tracking server answers for ``run_id``; False at ``deadline`` (``time.monotonic()``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    reported = False
    with _quiet_retries():
        while True:
            try:
                client.get_run(run_id)
                return True
            except Exception as exc:
                if _is_refusal(exc):
                    raise
                if not reported:
                    reported = True
                    log.warning(
                        "tracking server %s unreachable (%s): waiting up to %.0f s more",
                        tracking_uri(),
                        _first_line(exc),
                        max(0.0, deadline - time.monotonic()),
                    )
            if time.monotonic() + RETRY_PAUSE_S >= deadline:
                return False
            time.sleep(RETRY_PAUSE_S)


def forget_active_run() -> None:
    """Drop the active run in this process without a word to the server, which is unreachable.

    MLflow's exit hook would otherwise end it (FINISHED, after minutes of retries); it must stay as it is, to
    be resumed. MLflow has no public call for this: the run stack is internal.
    """
    from mlflow.environment_variables import MLFLOW_RUN_ID
    from mlflow.tracking import fluent

    with contextlib.suppress(Exception):
        fluent._active_run_stack.get().clear()
        MLFLOW_RUN_ID.unset()


def send_pending_metrics(outbox: MetricsOutbox, checkpoint_dir: pathlib.Path) -> float:
    """Wait (``CARCLF_TRACKING_WAIT_S`` at most) until every epoch's metrics are on the server; returns the
    deadline (``time.monotonic()``) that the stages after training share."""
    deadline = time.monotonic() + tracking_wait_s()
    if outbox.pending():
        log.info("training done: waiting for the tracking server to take %d metric batch(es)", outbox.pending())
    if not outbox.wait_until_sent(deadline):
        raise unavailable(checkpoint_dir, "sending the epochs' metrics")
    return deadline


def wait_for_tracking(run_id: str, deadline: float, checkpoint_dir: pathlib.Path, what: str) -> None:
    """Return once the tracking server answers; ``TrackingUnavailable`` when it has not by ``deadline``."""
    if not wait_for_server(run_id, deadline):
        raise unavailable(checkpoint_dir, what)
