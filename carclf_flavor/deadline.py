"""A request's deadline: the served model stops working on a request its server has already given up on.

MLflow's scoring server (``mlflow models serve``) answers 504 once a request has taken
$MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT seconds (it sets the variable for its workers, 60 by default), but the
thread running ``predict`` goes on: without a deadline a timed-out request would keep decoding and classifying
for nobody while new requests wait. ``predict`` takes the same timeout as its deadline and checks it between
rows, before each decode and before each network call. Only the standard library is imported.
"""

from __future__ import annotations

import os
import time

REQUEST_TIMEOUT_ENV_VAR = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"


class DeadlinePassed(RuntimeError):
    """The request's deadline passed; the message says after how long, where, and what set it."""


def request_timeout_from_environment(env=None) -> float | None:
    """Seconds a request may take ($MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT), None when it is not set."""
    env = os.environ if env is None else env
    raw = str(env.get(REQUEST_TIMEOUT_ENV_VAR, "")).strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{REQUEST_TIMEOUT_ENV_VAR} must be a positive number of seconds, got {raw!r}")
    return seconds


class Deadline:
    """``seconds`` from now (None: never). ``check(where)`` raises ``DeadlinePassed`` once it has passed."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._at = None if seconds is None else time.monotonic() + float(seconds)

    def passed(self) -> bool:
        return self._at is not None and time.monotonic() > self._at

    def check(self, where: str) -> None:
        if self.passed():
            raise DeadlinePassed(
                f"request timed out after {self.seconds:g} s ({REQUEST_TIMEOUT_ENV_VAR}); stopped {where}"
            )


NO_DEADLINE = Deadline(None)
