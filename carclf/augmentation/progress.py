"""Progress of a long Spark job: finished/total tasks of its job group, logged every few seconds."""

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

    def __enter__(self):
        try:
            self.sc = self.spark.sparkContext
            self.sc.setJobGroup(self.group, "carclf augment", interruptOnCancel=True)
        except Exception:  # Spark Connect: no SparkContext, no progress
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

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
        last = -1
        tracker = self.sc.statusTracker()
        while not self._stop.wait(self.every_s):
            done = self._tasks(tracker, "numCompletedTasks")
            if done != last:
                log.info("augment: %d/%d Spark tasks done", done, self.total)
                last = done

    def wait_until_idle(self, timeout_s: float = 15.0) -> None:
        """After a failed job, wait (bounded) for its still-running attempts to be killed, so none of them
        writes a shard after the driver has cleaned the shard folder."""
        try:
            tracker = self.sc.statusTracker()
        except AttributeError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._tasks(tracker, "numActiveTasks") == 0:
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=1)
        try:
            self.sc.setLocalProperty("spark.jobGroup.id", None)
        except Exception:
            pass
        return False
