"""MLflow helpers shared by the pipeline steps."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import mlflow

from carclf.tracking.run_owner import claim_run


@contextlib.contextmanager
def step_run(step: str):
    """Log into the active run (the one `mlflow run` gave the step), or into a run of the step's own.

    Either way the run is tagged as ``step``'s, owned by this process, and the step's runs whose process died
    are set KILLED (``carclf.tracking.run_owner``). A run of its own ends KILLED on Ctrl-C, FAILED when the
    block raises, FINISHED otherwise; an active run is left to its owner (`mlflow run` sets its status from the
    step's exit code).
    """
    active = mlflow.active_run()
    if active is not None:
        claim_run(active, step)
        yield active
        return
    run = mlflow.start_run()
    try:
        claim_run(run, step)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_new_params(params: Mapping[str, Any]) -> None:
    """Log the parameters the active run does not have yet.

    Under `mlflow run` the project's own parameter strings are logged before the step starts (quoted for
    the shell, e.g. '' or 'local[*]', and as given, e.g. "224.0" or "true"); MLflow refuses to change a
    logged value, so a step's normalised copy of the same parameter is left out instead of failing the run.
    """
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run is not None else {}
    new = {k: str(v) for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)
