"""`main`'s child steps: each runs through ``mlflow.projects.run`` as a child run, or a finished identical run is reused.

Reuse rule: the newest FINISHED run of the same entry point with the same parameters, the same code (a hash of
``carclf``, ``carclf_flavor``, ``entry_points`` and ``MLproject``) and the same inputs (fingerprints of the files
it read), whose recorded outputs are still on disk unchanged. The tags below record what a run read and wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import shlex

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from carclf.files.fingerprint import file_fingerprint

log = logging.getLogger(__name__)
PROJECT_DIR = pathlib.Path(__file__).resolve().parents[2]

TAG_INPUTS = "carclf.inputs_fingerprint"
TAG_OUTPUTS = "carclf.outputs"
TAG_CODE = "carclf.code_fingerprint"
TAG_REUSED = "carclf.reused_run_"


class StepFailed(RuntimeError):
    """A child step ended in a state other than FINISHED."""


def code_fingerprint() -> str:
    """Identity of the project's code: a finished run of older code is not reused."""
    digest = hashlib.sha256()
    for folder in ("carclf", "carclf_flavor", "entry_points"):
        for source in sorted((PROJECT_DIR / folder).rglob("*.py")):
            digest.update(source.relative_to(PROJECT_DIR).as_posix().encode())
            digest.update(source.read_bytes())
    digest.update((PROJECT_DIR / "MLproject").read_bytes())
    return digest.hexdigest()


def _outputs_unchanged(run) -> bool:
    recorded = run.data.tags.get(TAG_OUTPUTS)
    if recorded is None:
        return False
    return all(file_fingerprint(path) == fingerprint for path, fingerprint in json.loads(recorded).items())


def _same_param(logged: str | None, value: str) -> bool:
    # `mlflow run` logs parameters as they were quoted for the shell ('' for an empty string).
    return logged is not None and (logged == value or logged == shlex.quote(value))


def find_reusable_run(
    client: MlflowClient, experiment_id: str, entry_point: str, parameters: dict, inputs_fingerprint: str, code: str
):
    """The newest FINISHED run of ``entry_point`` with equal parameters, inputs and code, outputs intact."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}' "
        f"and tags.`{TAG_INPUTS}` = '{inputs_fingerprint}' and tags.`{TAG_CODE}` = '{code}' "
        f"and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        if all(_same_param(run.data.params.get(k), v) for k, v in parameters.items()) and _outputs_unchanged(run):
            return run
    return None


def run_child_step(
    entry_point: str, parameters: dict, inputs: list, outputs: list, *, force: bool, code: str, experiment_id: str
):
    """Run one step as a child run (or reuse a finished identical one); returns the MLflow run."""
    client = MlflowClient()
    parameters = {k: str(v) for k, v in parameters.items()}
    fingerprint = hashlib.sha256(
        json.dumps({str(p): file_fingerprint(p) for p in inputs}, sort_keys=True).encode()
    ).hexdigest()
    if not force:
        reusable = find_reusable_run(client, experiment_id, entry_point, parameters, fingerprint, code)
        if reusable is not None:
            log.info(
                "step %s: reusing finished run %s (same parameters, inputs and code)", entry_point, reusable.info.run_id
            )
            mlflow.set_tag(TAG_REUSED + entry_point, reusable.info.run_id)
            return reusable
    log.info("step %s: running with %s", entry_point, parameters)
    submitted = mlflow.projects.run(
        str(PROJECT_DIR),
        entry_point=entry_point,
        parameters=parameters,
        env_manager="local",
        experiment_id=experiment_id,
        synchronous=False,
    )
    succeeded = submitted.wait()
    run = client.get_run(submitted.run_id)
    if not succeeded or run.info.status != RunStatus.to_string(RunStatus.FINISHED):
        raise StepFailed(f"step '{entry_point}' failed (run {submitted.run_id}, status {run.info.status})")
    client.set_tag(run.info.run_id, TAG_INPUTS, fingerprint)
    client.set_tag(run.info.run_id, TAG_CODE, code)
    client.set_tag(run.info.run_id, TAG_OUTPUTS, json.dumps({str(p): file_fingerprint(p) for p in outputs}))
    return client.get_run(run.info.run_id)


def registered_version_of(run) -> str | None:
    """The model version that a train run registered, if any."""
    versions = MlflowClient().search_model_versions(f"run_id = '{run.info.run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None
