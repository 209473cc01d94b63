"""Progress of a long Spark job: finished/total tasks, logged every few seconds.

Classic sessions: the job group's stages, read from the SparkContext's status tracker by a thread. Spark
Connect has no SparkContext; its server streams the progress of each query to the client, which hands it to
the session's progress handlers (``SparkSession.registerProgressHandler``): the same line comes from there.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class SparkTaskProgress:
    """Logs finished/total Spark tasks of the job group every few seconds (a long job shows progress)."""

    def __init__(self, spark, group: str, total: int, every_s: float = 5.0):
        self.spark, self.group, self.total, self.every_s = spark, group, total, every_s
        self._stop = threading.Event()
        self._thread = None
        self.sc = None
        self._connect_handler = None
        self._last_logged, self._last_logged_at = -1, 0.0

    def __enter__(self):
        from carclf.compute.spark_session import is_connect_session

        if is_connect_session(self.spark):
            self._connect_handler = self._on_connect_progress
            self.spark.registerProgressHandler(self._connect_handler)
            return self
        try:
            self.sc = self.spark.sparkContext
            self.sc.setJobGroup(self.group, "carclf augment", interruptOnCancel=True)
        except Exception:  # a managed runtime that hides the SparkContext: no progress
            self.sc = None
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _report(self, done: int, final: bool = False) -> None:
        """One line when the count moved, at most every ``every_s`` seconds (and at the end)."""
        now = time.monotonic()
        if done != self._last_logged and (final or now - self._last_logged_at >= self.every_s):
            log.info("augment: %d/%d Spark tasks done", done, self.total)
            self._last_logged, self._last_logged_at = done, now

    def _on_connect_progress(self, stages, inflight_tasks, operation_id, done):
        """Connect's progress handler (called in the thread that waits for the query's results). Its last
        call repeats the last report the server sent, which may predate the last tasks: ``completed`` says
        the end."""
        if not done:
            self._report(sum(stage.num_completed_tasks for stage in stages or ()))

    def completed(self) -> None:
        """The job succeeded: the closing line, every task done."""
        self._report(self.total, final=True)

    def _tasks(self, tracker, count: str) -> int:
        """Sum of one task count (``numCompletedTasks``, ``numActiveTasks``) over this job group's stages."""
        total = 0
        for job_id in tracker.getJobIdsForGroup(self.group):
            job = tracker.getJobInfo(job_id)
            for stage_id in job.stageIds if job else []:
                stage = tracker.getStageInfo(stage_id)
                total += getattr(stage, count) if stage else 0
        return total

    def _run(self):
        tracker = self.sc.statusTracker()
        while not self._stop.wait(self.every_s):
            self._report(self._tasks(tracker, "numCompletedTasks"))

    def wait_until_idle(self, timeout_s: float = 15.0) -> None:
        """After a failed job, wait (bounded) for its still-running attempts to be killed, so none of them
        writes a shard after the driver has cleaned the shard folder. Classic sessions only: on Connect the
        server ends a failed query's tasks itself and tells the client nothing more."""
        if self.sc is None:
            return
        tracker = self.sc.statusTracker()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._tasks(tracker, "numActiveTasks") == 0:
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=1)
        if self._connect_handler is not None:
            self.spark.removeProgressHandler(self._connect_handler)
        elif self.sc is not None:
            try:
                self.sc.setLocalProperty("spark.jobGroup.id", None)
            except Exception:
                pass
        return False
