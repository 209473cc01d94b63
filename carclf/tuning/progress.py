"""Progress of a study on the driver: a line per finished trial (number, state, value, params, best so far).

The trials run elsewhere (Spark tasks); their results are in MLflow, so the lines are read from the tracking
store, every ``PROGRESS_POLL_S`` seconds and once more at the end.
"""

from __future__ import annotations

import logging
import pathlib
import sys
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

PROGRESS_POLL_S = 2.0
ERROR_ARTIFACT = "error_message.txt"  # MlflowSparkStudy's traceback of a failed trial


def finished_states():
    """Trial states that count towards ``trials`` (a failed trial is made up for)."""
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)


def rank(trial) -> tuple:
    """Higher is better: the value, then the earlier trial on a tie."""
    return (trial.value, -trial.number)


def format_params(params: Mapping) -> str:
    return "{" + ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in params.items()) + "}"


def failure_reason(run_id: str) -> str:
    """One line: why the trial of this child run failed. `train` tags its run ``carclf.error``; a trial that
    failed outside `train` has only MLflow's ``error_message.txt`` (a traceback: its last line says it)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from carclf.training.run import TAG_ERROR

    client = MlflowClient()
    try:
        reason = client.get_run(run_id).data.tags.get(TAG_ERROR)
        if not reason:
            with tempfile.TemporaryDirectory() as folder:
                text = pathlib.Path(client.download_artifacts(run_id, ERROR_ARTIFACT, folder)).read_text()
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            reason = lines[-1] if lines else ""
    except Exception as exc:  # the line must not stop the study: say where the reason is instead
        log.debug("no failure reason for run %s: %s", run_id, exc)
        reason = ""
    return reason.splitlines()[0][:500] if reason else f"reason: see run {run_id}"


class TrialProgress:
    """A line per finished trial (number, state, value, params, best so far), read from the tracking store
    on the driver: the trials run elsewhere, their results are in MLflow."""

    def __init__(self, experiment_id: str, study_run_id: str, total: int, out=None):
        self.experiment_id, self.study_run_id, self.total = experiment_id, study_run_id, total
        self.out = out or sys.stdout
        self.seen: set = set()
        self.best = None
        self._storage = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="carclf-tune-progress")

    def prime(self, trials) -> None:
        """Trials of an earlier run: known (no line), but they count for the best so far."""
        for trial in trials:
            if trial.state in finished_states() or trial.state.is_finished():
                self.seen.add(trial._trial_id)
                self._update_best(trial)

    def _update_best(self, trial) -> None:
        from optuna.trial import TrialState

        if trial.state == TrialState.COMPLETE and trial.value is not None:
            if self.best is None or rank(trial) > rank(self.best):
                self.best = trial

    def poll(self) -> None:
        from mlflow.optuna.storage import MlflowStorage

        if self._storage is None:
            self._storage = MlflowStorage(experiment_id=self.experiment_id)
        trials = self._storage.get_all_trials(self.study_run_id)
        # A complete trial's run is closed a moment before its value is written: wait for the value.
        done = [
            t
            for t in trials
            if t.state.is_finished()
            and t._trial_id not in self.seen
            and not (t.state.name == "COMPLETE" and t.value is None)
        ]
        for trial in sorted(done, key=lambda t: t.datetime_complete or t.datetime_start):
            self.seen.add(trial._trial_id)
            self._update_best(trial)
            value = f"val top-1 {trial.value:.4f}" if trial.value is not None else "no value"
            if trial.state.name == "FAIL":
                value += f" ({failure_reason(trial._trial_id)})"
            best = (
                f"best so far {self.best.value:.4f} (trial {self.best.number})"
                if self.best is not None
                else "no complete trial yet"
            )
            finished = sum(1 for t in trials if t.state.is_finished())
            state = {"COMPLETE": "complete", "FAIL": "failed", "PRUNED": "pruned"}.get(
                trial.state.name, trial.state.name.lower()
            )
            print(
                f"[tune] trial {trial.number} {state}: {value} {format_params(trial.params)}"
                f"  | {best}  [{finished} finished, target {self.total}]",
                file=self.out,
                flush=True,
            )

    def _loop(self) -> None:
        while not self._stop.wait(PROGRESS_POLL_S):
            try:
                self.poll()
            except Exception as exc:  # progress must never stop the study
                log.debug("progress poll failed: %s", exc)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.poll()
        except Exception as error:
            log.debug("final progress poll failed: %s", error)
