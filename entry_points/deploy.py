"""`deploy`: put a registered carclf model behind a REST endpoint on Azure ML or on this machine.

    python -m entry_points.deploy --model-uri models:/carclf/1 --target <azureml workspace URI> \
        --name car-resnet [--traffic 100] [--delete-old true] [--auth auto|service_principal|cli|managed_identity]
    python -m entry_points.deploy --model-uri models:/carclf/1 --target <azureml workspace URI> \
        --name car-batch --kind batch [--compute-cluster cpu-cluster] [--mini-batch-size 10]
    python -m entry_points.deploy --model-uri models:/carclf/1 --target carclf-local --name cars [--port 5001]

Azure ML goes through MLflow's `azureml` deployment plugin (azureml-mlflow). The default is a managed
online endpoint `name`, updated blue/green the way Azure recommends: the endpoint is created when missing
(key auth), the new model goes into a second deployment (`blue`/`green`) at 0% traffic beside the live
one, is smoke-tested with a real photo through the `azureml-model-deployment` header, and only then gets
the traffic (all of it, or a canary share); a failed smoke test leaves the traffic as it was. `compute=aci|aks`
(SDK v1 web services, support ended 2026-06-30) stay for existing workspaces. This step writes the config
files the plugin expects (the same files work with `mlflow deployments create -t azureml ...
-C deploy-config-file=deploy/managed.json`; examples under deploy/). Before anything is written or sent, `azure_preflight` checks the
target URI and finds the credential source from environment variables and files alone, then checks that
Azure is reachable (TCP only, short timeouts): a missing login fails in seconds with one line, instead of
minutes later inside the plugin (whose credential chain ends in interactive/device-code logins).

This module is the step's parameters and CLI; the work is done in ``carclf.deployment`` (``targets``,
``azure_target``, ``blue_green``, ``azure_config``, ``local_target``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import param, resolve_config, run_step
from carclf.deployment.azure_config import COMPUTE_CHOICES, KIND_CHOICES
from carclf.deployment.azure_preflight import AUTH_CHOICES, PreflightError
from carclf.deployment.errors import DeployError
from carclf.deployment.targets import LOCAL_TARGET, deploy_model

__all__ = ["DeployConfig", "DeployError", "build_parser", "deploy", "main"]


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """The `deploy` step's parameters (CLI flags, MLproject parameters and keyword arguments alike).

    ``target`` and ``name`` default to the local target and ``car-resnet`` on the CLI and in calls as in
    MLproject: one rule, the declaration's default applies everywhere. ``None`` = not set (``""`` in MLproject and on the CLI).
    """

    model_uri: str = param(help="models:/<name>/<version>")
    target: str = param(LOCAL_TARGET, "azureml://<region>.api.azureml.ms/mlflow/v1.0/... or carclf-local")
    name: str = param("car-resnet", "deployment name")
    kind: str = param(
        "online",
        "online: a managed online endpoint (REST); batch: an Azure ML batch endpoint for folders of photos",
        choices=KIND_CHOICES,
    )
    compute: str = param(
        "managed",
        "managed online endpoint (default); aci/aks are deprecated SDK v1 web services",
        choices=COMPUTE_CHOICES,
    )
    traffic: int = param(100, "managed: the new deployment's share, 1-100")
    delete_old: bool = param(False, "managed: delete deployments left at 0%")
    smoke_image: str | None = param(None, "managed: photo for the smoke test")
    endpoint_auth: str = param("key", "managed: key (default), aml_token or aad_token")
    cpu_cores: float = param(3.0, "CPU cores per instance (aci/aks)", parse=_positive_float)
    memory_gb: float = param(12.0, "memory per instance (aci/aks)", parse=_positive_float)
    instance_type: str = param("Standard_DS3_v2", "managed: VM size")
    instance_count: int = param(1, "managed: instances; batch: nodes per job")
    compute_cluster: str = param("cpu-cluster", "batch: the workspace's compute cluster that runs the jobs")
    mini_batch_size: int = param(10, "batch: photos per run() call of the scoring script")
    max_concurrency: int = param(1, "batch: scoring processes per node")
    output_file_name: str = param(
        "predictions.csv", "batch: the job's CSV of file, label, class_id, prob, top_k, error"
    )
    auth: str = param("auto", "how to sign in to Azure", choices=AUTH_CHOICES)
    config_dir: str | None = param(
        None, "keep the generated deploy-config file here (default: temporary, logged to the run)"
    )
    aks_compute: str = param("aks-cluster", "AKS cluster attached to the workspace")
    min_replicas: int = param(1, "aks: fewest replicas")
    max_replicas: int = param(4, "aks: most replicas")
    request_timeout: int = param(90, "seconds per scoring request")
    network_check: bool = param(True, "check that the workspace is reachable before anything else")
    port: int | None = param(None, "carclf-local: port")
    workers: int | None = param(None, "carclf-local: server workers")
    # CLI only (not in MLproject):
    auth_enabled: bool = param(True, "key auth on ACI/AKS services", mlproject=False)
    host: str | None = param(None, "carclf-local: interface (127.0.0.1)", mlproject=False)
    home: str | None = param(None, "carclf-local: state folder", mlproject=False)
    # Calls only:
    network_timeout_s: float = param(5.0, "seconds the network check waits", cli=False, mlproject=False)


def deploy(config: DeployConfig | None = None, **overrides) -> dict:
    """Deploy `model_uri` as `name` on `target`.

    target: an Azure ML workspace tracking URI (azureml://...) or `carclf-local[:/state/folder]`.
    Azure, compute=managed (default): blue/green on the managed online endpoint `name` (see the module
    docstring); `traffic` is the new deployment's share (100, or 1-99 for a canary), `delete_old` removes
    the deployments left without traffic, `smoke_image` is the photo of the smoke test (default: a
    rendered JPEG). compute=aci|aks: create, or update when `name` exists (deprecated).
    Azure, kind=batch: the batch endpoint `name` (created when missing) and its deployment `carclf` (created
    or updated) running carclf/deployment/azure_batch_code/score.py on `compute_cluster`; start jobs with
    ``entry_points.score --azure-batch-endpoint``.
    Nothing is written, tracked or sent until the preflight passed. The config files go to `config_dir`
    (kept) or a temporary folder (removed after they were logged to the run).
    Local: port/workers/host/home/request_timeout are passed to the carclf-local target.
    Takes a ``DeployConfig`` or its fields as keywords (``deploy(model_uri=..., target=..., name=...)``).
    """
    c = resolve_config(DeployConfig, config, **overrides)
    return deploy_model(**{field.name: getattr(c, field.name) for field in dataclasses.fields(c)})


# ----------------------------------------------------------------------------------------------- CLI
_PROG = "python -m entry_points.deploy"


def build_parser() -> argparse.ArgumentParser:
    return build_parser_for(DeployConfig, _PROG, __doc__.split("\n")[0])


def _is_known_failure(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    known: tuple = (MlflowException, OSError)
    with contextlib.suppress(ImportError):
        from azure.core.exceptions import AzureError

        known += (AzureError,)
    with contextlib.suppress(ImportError):
        import requests

        known += (requests.RequestException,)
    return isinstance(exc, known)


def _error_line(exc: BaseException, config: DeployConfig) -> str | None:
    if isinstance(exc, (DeployError, PreflightError)):
        return str(exc)
    if not _is_known_failure(exc):  # MlflowException and the Azure SDK's errors: one line, cause included
        return None
    text = str(getattr(exc, "message", None) or exc).strip()
    lines = text.splitlines() or [type(exc).__name__]
    cause = exc.__cause__
    because = f" (cause: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause else ""
    # Lines after the first (e.g. the local server's log tail) follow the one error line.
    return "\n".join([f"{lines[0]}{because}", *lines[1:]])


def _print_result(result: dict, config: DeployConfig) -> None:
    print(json.dumps(result, indent=2, default=str))


def main(argv=None) -> int:
    # The Azure SDK logs every HTTP request and the plugin every URI parse at INFO: keep the output readable.
    for noisy in ("azure", "azureml", "msal", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_step(
        deploy,
        DeployConfig,
        _PROG,
        __doc__.split("\n")[0],
        argv,
        error_line=_error_line,
        print_result=_print_result,
        log_format="%(levelname)s %(name)s: %(message)s",
    )


if __name__ == "__main__":
    sys.exit(main())
