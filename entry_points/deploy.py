"""`deploy`: put a registered carclf model behind a REST endpoint on Azure ML or on this machine.

    python -m entry_points.deploy --model-uri models:/carclf/1 --target <azureml workspace URI> \
        --name car-resnet [--traffic 100] [--delete-old true] [--auth auto|service_principal|cli|managed_identity]
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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import param, resolve_config, run_step
from carclf.deployment.azure_preflight import (
    AUTH_CHOICES,
    PreflightError,
    check_reachable,
    find_credential,
    is_azureml_target,
    parse_target,
)

log = logging.getLogger(__name__)

COMPUTE_CHOICES = ("managed", "aci", "aks")
LEGACY_COMPUTE = ("aci", "aks")
# Blue/green slots of a managed endpoint: the new model goes into the one that carries no traffic.
DEPLOYMENT_SLOTS = ("blue", "green")
# The flavor reads CARCLF_ERRORS as the default of its `errors` param: Azure's no-code scoring script
# answers any exception with HTTP 500 and a fixed text, so on Azure a bad photo gets a per-row `error`.
AZURE_ENVIRONMENT = {"CARCLF_ERRORS": "coerce"}
# Smallest instance types Azure's MLflow no-code deployments are sized for (4 vCPUs, 14+ GiB).
_SMALL_INSTANCES = {
    "standard_ds1_v2",
    "standard_ds2_v2",
    "standard_f2s_v2",
    "standard_d2as_v4",
    "standard_e2s_v3",
    "standard_f1s",
    "standard_f2s",
    "standard_ds1",
    "standard_ds2",
    "standard_a1_v2",
    "standard_a2_v2",
    "standard_d2a_v4",
    "standard_d2s_v3",
    "standard_ds11_v2",
}
LOCAL_TARGET = "carclf-local"
PROJECT_DIR = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG_DIR = PROJECT_DIR / "deploy"
# Azure names web services / online endpoints: 3-32 characters, lower-case letters, digits and dashes,
# starting with a letter and not ending with a dash (unique per region for managed endpoints).
_AZURE_NAME = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
_DESCRIPTION = "carclf: car-model classifier (Keras ResNet with Scale layers), served by MLflow pyfunc"

# ACI/AKS: the image is built with the requirements inside; the model only has to import TensorFlow and load.
_PROBE_LIVENESS = {"initial_delay": 120, "period": 10, "timeout": 10, "failure_threshold": 30, "success_threshold": 1}
# Managed no-code deployments install the model's requirements.txt (TensorFlow, Keras, OpenCV: several
# minutes) when the container starts, before the scoring script even imports: a probe that starts early
# restarts the container in the middle of that install, forever. Liveness waits 10 minutes, readiness 5,
# and both tolerate 30 more failures 10 s apart.
_MANAGED_LIVENESS = {"initial_delay": 600, "period": 10, "timeout": 10, "failure_threshold": 30, "success_threshold": 1}
_MANAGED_READINESS = {
    "initial_delay": 300,
    "period": 10,
    "timeout": 10,
    "failure_threshold": 30,
    "success_threshold": 1,
}


class DeployError(Exception):
    """A bad parameter or a failed deployment; the message is one line."""


def _number(value: float):
    """3.0 -> 3 so the JSON files read like Azure's examples; 0.5 stays 0.5."""
    return int(value) if float(value).is_integer() else float(value)


def build_deploy_config(
    compute: str = "managed",
    cpu_cores: float = 3.0,
    memory_gb: float = 12.0,
    instance_type: str = "Standard_DS3_v2",
    instance_count: int = 1,
    aks_compute: str = "aks-cluster",
    min_replicas: int = 1,
    max_replicas: int = 4,
    request_timeout_s: int = 90,
    max_concurrent_requests: int = 2,
    auth_enabled: bool = True,
) -> dict:
    """The `deploy-config-file` content for the azureml plugin (ACI/AKS: the article's 3 cores and 12 GB)."""
    compute = (compute or "").strip().lower()
    if compute not in COMPUTE_CHOICES:
        raise DeployError(f"compute must be one of {', '.join(COMPUTE_CHOICES)}, got {compute!r}")
    if cpu_cores <= 0 or memory_gb <= 0:
        raise DeployError(f"cpu_cores ({cpu_cores}) and memory_gb ({memory_gb}) must be positive")
    if request_timeout_s < 1:
        raise DeployError(f"request_timeout_s must be >= 1, got {request_timeout_s}")
    if max_concurrent_requests < 1:
        raise DeployError(f"max_concurrent_requests must be >= 1, got {max_concurrent_requests}")
    resources = {"cpu": _number(cpu_cores), "memoryInGB": _number(memory_gb)}
    if compute == "aci":
        return {
            "computeType": "aci",
            "containerResourceRequirements": resources,
            "authEnabled": bool(auth_enabled),
            "description": _DESCRIPTION,
            "tags": {"project": "carclf"},
        }
    if compute == "aks":
        if not aks_compute or not aks_compute.strip():
            raise DeployError("compute=aks needs aks_compute: the name of the AKS cluster attached to the workspace")
        if min_replicas < 1 or max_replicas < min_replicas:
            raise DeployError(f"replicas: need 1 <= min_replicas ({min_replicas}) <= max_replicas ({max_replicas})")
        return {
            "computeType": "aks",
            "computeTargetName": aks_compute.strip(),
            "containerResourceRequirements": resources,
            "autoScaler": {
                "autoscaleEnabled": True,
                "minReplicas": min_replicas,
                "maxReplicas": max_replicas,
                "targetUtilization": 70,
                "refreshPeriodInSeconds": 10,
            },
            "scoringTimeoutMs": request_timeout_s * 1000,
            "maxConcurrentRequestsPerContainer": max_concurrent_requests,
            "livenessProbeRequirements": {
                "initialDelaySeconds": _PROBE_LIVENESS["initial_delay"],
                "periodSeconds": _PROBE_LIVENESS["period"],
                "timeoutSeconds": _PROBE_LIVENESS["timeout"],
                "failureThreshold": _PROBE_LIVENESS["failure_threshold"],
                "successThreshold": _PROBE_LIVENESS["success_threshold"],
            },
            "authEnabled": bool(auth_enabled),
            "description": _DESCRIPTION,
            "tags": {"project": "carclf"},
        }
    # managed online deployment (no computeType key: that is how the plugin picks this path). Only keys the
    # plugin copies into the REST body (others are dropped silently). No scale_settings: the plugin reads its
    # `type` but the REST model wants `scale_type`, so either spelling fails; Azure's default is the fixed
    # instance_count anyway.
    if not instance_type or not instance_type.strip():
        raise DeployError("compute=managed needs instance_type, e.g. Standard_DS3_v2")
    if instance_type.strip().lower() in _SMALL_INSTANCES:
        raise DeployError(
            f"instance_type {instance_type.strip()!r} is too small for a TensorFlow model served by "
            "Azure's no-code scorer: use Standard_DS3_v2 or larger"
        )
    if instance_count < 1:
        raise DeployError(f"instance_count must be >= 1, got {instance_count}")
    if request_timeout_s > 180:
        raise DeployError(f"managed online endpoints allow a request timeout of at most 180 s, got {request_timeout_s}")
    return {
        "instance_type": instance_type.strip(),
        "instance_count": instance_count,
        "request_settings": {
            # azureml-mlflow 1.62 copies request_timeout_ms unchanged into the REST field `request_timeout`,
            # an ISO 8601 duration: its own serializer rejects a plain millisecond number, so the value must
            # be written as a duration (tests/test_deploy.py checks both against the plugin's serializer).
            "request_timeout_ms": f"PT{request_timeout_s}S",
            "max_concurrent_requests_per_instance": max_concurrent_requests,
        },
        "liveness_probe": dict(_MANAGED_LIVENESS),
        "readiness_probe": dict(_MANAGED_READINESS),
        "environment_variables": dict(AZURE_ENVIRONMENT),
        "description": _DESCRIPTION,
    }


def build_endpoint_config(auth_mode: str = "key", traffic: dict | None = None) -> dict:
    """The `endpoint-config-file` for the plugin's create_endpoint/update_endpoint (managed endpoints).

    Key auth by default (a key that does not expire, unlike aml_token); the plugin's own default adds a
    system-assigned identity and the property that marks an MLflow endpoint, kept here too."""
    auth_mode = (auth_mode or "").strip().lower()
    if auth_mode not in ("key", "aml_token", "aad_token"):
        raise DeployError(f"endpoint_auth must be key, aml_token or aad_token, got {auth_mode!r}")
    if traffic is not None:
        return {"traffic": {name: int(share) for name, share in traffic.items()}}
    return {
        "auth_mode": auth_mode,
        "identity": {"type": "system_assigned"},
        "properties": {"azureml.mlflow_client_endpoint": "True"},
        "description": _DESCRIPTION,
        "tags": {"project": "carclf"},
    }


def render_config(config: dict) -> str:
    return json.dumps(config, indent=2) + "\n"


def write_config(config: dict, folder: pathlib.Path, compute: str) -> pathlib.Path:
    """Write `<compute>.json` under a temporary name and rename it, so a reader never sees half a file."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{compute}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{compute}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(render_config(config))
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return final


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


def _check_azure_model_uri(model_uri: str) -> None:
    if _MODEL_URI.match(model_uri or ""):
        return
    if (model_uri or "").startswith("runs:/") and os.environ.get("MLFLOW_TRACKING_URI", "").startswith("azureml"):
        return  # the plugin registers runs:/ models itself when tracking into the workspace
    raise DeployError(
        f"model_uri {model_uri!r}: the azureml target deploys registered models, give models:/<name>/<version> "
        "or models:/<name>@<alias> (registered in the workspace's registry)"
    )


def resolve_model_uri(model_uri: str) -> str:
    """models:/name@alias and models:/name/latest -> models:/name/<version>, with the MLflow client.

    azureml-mlflow 1.62 splits the URI on '/' (an alias becomes the model name `models:` and a version
    `carclf@champion`) and knows no `latest`: it must only ever see a number."""
    match = _MODEL_URI.match(model_uri or "")
    if not match:
        return model_uri
    name, version, alias = match.group("name"), match.group("version"), match.group("alias")
    if version and version.lower() != "latest":
        return model_uri
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if alias:
            resolved = client.get_model_version_by_alias(name, alias).version
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise DeployError(f"model_uri {model_uri!r}: registered model {name!r} has no versions")
            resolved = max(int(v.version) for v in versions)
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias else "its latest version"
        raise DeployError(
            f"model_uri {model_uri!r}: cannot resolve {what} of registered model {name!r} ({_one_line(exc.message)})"
        ) from None
    resolved_uri = f"models:/{name}/{resolved}"
    log.info("%s is %s", model_uri, resolved_uri)
    return resolved_uri


@contextlib.contextmanager
def _env_defaults(values: dict):
    """Set environment variables the user has not set, for the duration of the deployment call."""
    added = [key for key, value in values.items() if value and key not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _narrowed_credential_env(token_credentials: str) -> dict:
    """{"AZURE_TOKEN_CREDENTIALS": name} when this azure-identity understands a single credential name there
    (newer releases); older ones refuse unknown values, so then the plugin's default chain is left alone."""
    previous = os.environ.get("AZURE_TOKEN_CREDENTIALS")
    if previous is not None:
        return {}
    try:
        from azure.identity import DefaultAzureCredential

        os.environ["AZURE_TOKEN_CREDENTIALS"] = token_credentials
        DefaultAzureCredential()  # validates the variable; builds credentials, no network call
    except Exception:  # ValueError from an older azure-identity, or no azure-identity at all
        return {}
    finally:
        os.environ.pop("AZURE_TOKEN_CREDENTIALS", None)
    return {"AZURE_TOKEN_CREDENTIALS": token_credentials}


def _azure_error_in_chain(exc: BaseException):
    try:
        from azure.core.exceptions import AzureError
    except ImportError:
        return None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, AzureError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.strip().startswith("To mitigate")]
    return " ".join(lines[:3])


def _call_plugin(what: str, fn, *args, **kwargs):
    """Run a plugin call; an Azure SDK failure anywhere in the exception chain becomes one DeployError line
    (azureml-mlflow 1.62 sometimes masks it, e.g. with an AttributeError on a response-less HttpResponseError)."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        azure = _azure_error_in_chain(exc)
        if azure is None:
            raise
        raise DeployError(f"{what}: {_one_line(exc.message)} ({type(azure).__name__}: {_one_line(azure)})") from None
    except Exception as exc:
        azure = _azure_error_in_chain(exc)
        if azure is None:
            raise
        raise DeployError(f"{what}: {type(azure).__name__}: {_one_line(azure)}") from None


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _call_plugin(f"looking up deployment {name!r}", client.get_deployment, name)
    except MlflowException as exc:
        text = str(exc.message if hasattr(exc, "message") else exc)
        if (
            exc.error_code == "RESOURCE_DOES_NOT_EXIST"
            or "No deployment with name" in text
            or "no deployment named" in text
        ):
            return False
        raise
    return True


def _summary(deployment: dict) -> dict:
    """What is worth keeping in the run: no keys or tokens, just where and what."""
    keep = (
        "name",
        "flavor",
        "model_uri",
        "model_version",
        "url",
        "port",
        "pid",
        "status",
        "state",
        "scoringUri",
        "scoring_uri",
        "computeType",
        "provisioning_state",
    )
    summary = {k: deployment[k] for k in keep if k in deployment}
    properties = deployment.get("properties")
    if isinstance(properties, dict):
        for key in ("scoringUri", "provisioningState"):
            if key in properties:
                summary[key] = properties[key]
    return summary


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
    MLproject (they used to be required on the CLI only): one rule, the declaration's default applies
    everywhere. ``None`` = not set (``""`` in MLproject and on the CLI).
    """

    model_uri: str = param(help="models:/<name>/<version>")
    target: str = param(LOCAL_TARGET, "azureml://<region>.api.azureml.ms/mlflow/v1.0/... or carclf-local")
    name: str = param("car-resnet", "deployment name")
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
    instance_count: int = param(1, "managed: instances")
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
    Nothing is written, tracked or sent until the preflight passed. The config files go to `config_dir`
    (kept) or a temporary folder (removed after they were logged to the run).
    Local: port/workers/host/home/request_timeout are passed to the carclf-local target.
    Takes a ``DeployConfig`` or its fields as keywords (``deploy(model_uri=..., target=..., name=...)``).
    """
    c = resolve_config(DeployConfig, config, **overrides)
    model_uri, target, name, compute, auth, config_dir = (
        c.model_uri,
        c.target,
        c.name,
        c.compute,
        c.auth,
        c.config_dir,
    )
    network_check, network_timeout_s, request_timeout_s = c.network_check, c.network_timeout_s, c.request_timeout
    cpu_cores, memory_gb, instance_type, instance_count = c.cpu_cores, c.memory_gb, c.instance_type, c.instance_count
    aks_compute, min_replicas, max_replicas, auth_enabled = (
        c.aks_compute,
        c.min_replicas,
        c.max_replicas,
        c.auth_enabled,
    )
    traffic, delete_old, smoke_image, endpoint_auth = c.traffic, c.delete_old, c.smoke_image, c.endpoint_auth
    port, workers, host, home = c.port, c.workers, c.host, c.home
    if not model_uri:
        raise DeployError("model_uri is empty: give e.g. models:/carclf/1")
    if not target:
        raise DeployError(f"target is empty: give an azureml://... workspace URI or {LOCAL_TARGET}")
    if is_azureml_target(target):
        return _deploy_azure(
            model_uri,
            target,
            name,
            compute=compute,
            auth=auth,
            config_dir=config_dir,
            network_check=network_check,
            network_timeout_s=network_timeout_s,
            config_kwargs=dict(
                cpu_cores=cpu_cores,
                memory_gb=memory_gb,
                instance_type=instance_type,
                instance_count=instance_count,
                aks_compute=aks_compute,
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                request_timeout_s=request_timeout_s,
                auth_enabled=auth_enabled,
            ),
            rollout=dict(traffic=traffic, delete_old=delete_old, smoke_image=smoke_image, endpoint_auth=endpoint_auth),
        )
    if target.split(":", 1)[0] == LOCAL_TARGET:
        local_config = {"port": port, "workers": workers, "host": host, "home": home, "timeout": request_timeout_s}
        return _deploy_local(
            model_uri, target, name, {k: str(v) for k, v in local_config.items() if v not in (None, "")}
        )
    raise DeployError(f"unsupported target {target!r}: use an azureml://... workspace URI or {LOCAL_TARGET}")


def _check_rollout(traffic, delete_old, smoke_image, endpoint_auth) -> bytes:
    """Offline checks of the blue/green parameters; returns the smoke-test photo's bytes."""
    if isinstance(traffic, bool) or not isinstance(traffic, int) or not 1 <= traffic <= 100:
        raise DeployError(
            f"traffic must be a whole percentage from 1 to 100 (the new deployment's share), got {traffic!r}"
        )
    if delete_old and traffic != 100:
        raise DeployError(
            f"delete_old needs traffic=100 (a {traffic}% canary still sends the rest to the old deployment)"
        )
    build_endpoint_config(endpoint_auth)
    if smoke_image:
        path = pathlib.Path(smoke_image)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DeployError(f"smoke_image {str(path)!r}: cannot read ({exc.strerror or exc})") from None
        if not data:
            raise DeployError(f"smoke_image {str(path)!r} is empty")
        return data
    return default_smoke_photo()


def default_smoke_photo() -> bytes:
    """A real JPEG of a car-like scene (the sample-data renderer), for the smoke test."""
    import io

    import numpy as np
    from PIL import Image

    from carclf.data.sample_data import render_photo

    pixels, _box = render_photo(0, np.random.default_rng(0), 96, 128)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _check_azure_plugin_installed() -> None:
    import importlib.util

    try:
        found = importlib.util.find_spec("azureml.mlflow") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise DeployError(
            "the azureml target needs the Azure ML plugin: pip install 'carclf[azure]' "
            "(azureml-mlflow 1.62, which pins MLflow 3.15.0)"
        )


def _check_azure_scorer_can_boot(model_uri: str) -> None:
    """Azure's no-code scorer builds a sample of every output column at boot; a nested column stops it there."""
    from mlflow.models import get_model_info
    from mlflow.types.schema import DataType

    try:
        signature = get_model_info(model_uri).signature
    except Exception:  # an unreadable model is reported by the plugin itself, with its own reason
        return
    outputs = signature.outputs if signature is not None else None
    nested = [
        column.name
        for column in (outputs.inputs if outputs is not None else [])
        if not isinstance(column.type, DataType)
    ]
    if nested:
        raise DeployError(
            f"model {model_uri}: its output schema has columns that are not plain types ({', '.join(map(str, nested))}), "
            "so Azure's no-code scorer would fail at boot; it was saved by carclf < 0.2: re-log it with this version"
        )


def _deploy_azure(
    model_uri, target, name, compute, auth, config_dir, network_check, network_timeout_s, config_kwargs, rollout
) -> dict:
    # 1. Everything that can be checked offline, before anything is written or sent.
    _check_azure_plugin_installed()
    if not _AZURE_NAME.match(name or ""):
        raise DeployError(
            f"name {name!r}: Azure needs 3-32 lower-case letters, digits or dashes, starting with a letter "
            "and not ending with a dash"
        )
    azure_target = parse_target(target)
    _check_azure_model_uri(model_uri)
    compute = (compute or "").strip().lower()
    config = build_deploy_config(compute, **config_kwargs)
    managed = compute == "managed"
    if managed:
        smoke_photo = _check_rollout(**rollout)
    else:
        log.warning(
            "compute=%s is deprecated: Azure ML SDK v1 web services (ACI/AKS) lost support on 2026-06-30; "
            "use compute=managed (the default) for a managed online endpoint",
            compute,
        )
    credential = find_credential(auth, azure_target)
    log.info("credential source: %s", credential.detail)
    if network_check:
        check_reachable(azure_target, timeout=network_timeout_s)

    import mlflow
    from mlflow.deployments import get_deploy_client

    model_uri = resolve_model_uri(model_uri)
    _check_azure_scorer_can_boot(model_uri)
    registry = mlflow.get_registry_uri() or ""
    if not registry.startswith("azureml"):
        log.warning(
            "the azureml plugin deploys %s from the WORKSPACE's model registry (current registry: %s): "
            "register the model there first (MLFLOW_TRACKING_URI=<workspace URI>)",
            model_uri,
            registry,
        )
    # 2. Write the config files (kept in config_dir, or a temporary folder removed at the end).
    scratch = None
    if config_dir:
        folder = pathlib.Path(config_dir)
    else:
        scratch = pathlib.Path(tempfile.mkdtemp(prefix="carclf-deploy-"))
        folder = scratch
    try:
        config_path = write_config(config, folder, compute)
        from carclf.tracking.runs import log_new_params, step_run

        with step_run():
            log_new_params(
                {
                    "target": target,
                    "name": name,
                    "model_uri": model_uri,
                    "compute": compute,
                    "auth": credential.kind,
                    **({"traffic": rollout["traffic"]} if managed else {}),
                }
            )
            mlflow.log_artifact(str(config_path), artifact_path="deploy")
            with _env_defaults(
                {"AZUREML_CURRENT_CLOUD": azure_target.cloud, **_narrowed_credential_env(credential.token_credentials)}
            ):
                client = _call_plugin("building the azureml deployment client", get_deploy_client, target)
                if managed:
                    result = _blue_green(
                        client,
                        name,
                        model_uri,
                        config_path,
                        folder,
                        smoke_photo,
                        **{k: rollout[k] for k in ("traffic", "delete_old", "endpoint_auth")},
                    )
                    mlflow.log_dict(result, "deploy/rollout.json")
                    mlflow.set_tags(
                        {
                            "carclf.deploy.action": result["action"],
                            "carclf.deploy.target": target,
                            "carclf.deploy.deployment": result["deployment"],
                        }
                    )
                    return {
                        "name": name,
                        "flavor": "python_function",
                        "target": target,
                        "model_uri": model_uri,
                        "config_file": str(config_path) if scratch is None else None,
                        **result,
                    }
                deploy_config = {"deploy-config-file": str(config_path)}
                if _exists(client, name):
                    _call_plugin(
                        f"updating {name!r}", client.update_deployment, name, model_uri=model_uri, config=deploy_config
                    )
                    action = "updated"
                    deployment = _call_plugin(f"reading back {name!r}", client.get_deployment, name)
                else:
                    deployment = _call_plugin(
                        f"creating {name!r}", client.create_deployment, name, model_uri, config=deploy_config
                    )
                    action = "created"
            summary = _summary(deployment)
            mlflow.set_tags({"carclf.deploy.action": action, "carclf.deploy.target": target})
            mlflow.log_dict(summary, "deploy/deployment.json")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {
        "name": name,
        "flavor": deployment.get("flavor", "python_function"),
        "target": target,
        "model_uri": model_uri,
        "action": action,
        "config_file": str(config_path) if scratch is None else None,
        "deployment": summary,
    }


# ------------------------------------------------------------------------------- managed: blue/green
def _is_not_found(exc: BaseException) -> bool:
    azure = _azure_error_in_chain(exc)
    response = getattr(azure, "response", None)
    return getattr(azure, "status_code", None) == 404 or getattr(response, "status_code", None) == 404


def _find_endpoint(client, name: str) -> dict | None:
    """The endpoint as the plugin describes it, or None when Azure answers 404."""
    try:
        return client.get_endpoint(name)
    except Exception as exc:
        if _is_not_found(exc):
            return None
        azure = _azure_error_in_chain(exc)
        if azure is None:
            raise
        raise DeployError(f"looking up endpoint {name!r}: {type(azure).__name__}: {_one_line(azure)}") from None


def _traffic_of(endpoint: dict | None) -> dict:
    properties = (endpoint or {}).get("properties") or {}
    return {k: int(v) for k, v in (properties.get("traffic") or {}).items()}


def choose_slot(traffic: dict, existing: list[str]) -> str:
    """The blue/green slot for the new model: the one that carries no traffic (blue on a new endpoint)."""
    free = [slot for slot in DEPLOYMENT_SLOTS if traffic.get(slot, 0) == 0]
    if not free:
        raise DeployError(
            f"both {' and '.join(DEPLOYMENT_SLOTS)} carry traffic ({_traffic_text(traffic)}): finish the canary "
            "first (deploy again with traffic=100) or move the traffic back in Azure ML studio"
        )
    # Prefer a slot that does not exist yet, then one idle at 0% (left over by a failed rollout).
    return next((slot for slot in free if slot not in existing), free[0])


def split_traffic(old: dict, new: str, share: int) -> dict:
    """`share`% to `new`, the rest to the deployments that had traffic, in their old proportions."""
    live = {k: v for k, v in old.items() if v > 0 and k != new}
    if share == 100 or not live:
        return {**{k: 0 for k in old if k != new}, new: 100}
    rest = 100 - share
    total = sum(live.values())
    scaled = {k: rest * v // total for k, v in live.items()}
    biggest = max(live, key=live.get)
    scaled[biggest] += rest - sum(scaled.values())  # the rounding remainder
    return {**{k: 0 for k in old if k != new}, **scaled, new: share}


def _traffic_text(traffic: dict) -> str:
    return ", ".join(f"{k}={v}%" for k, v in sorted(traffic.items())) or "no traffic"


def smoke_test(client, endpoint: str, deployment: str, photo: bytes) -> dict:
    """Score one photo on `deployment` alone (the plugin sends the azureml-model-deployment header);
    returns the first answer row or raises DeployError saying why, in one line."""
    import base64

    import pandas as pd

    frame = pd.DataFrame({"image": [base64.b64encode(photo).decode("ascii")]})
    what = f"smoke test of deployment {deployment!r} on endpoint {endpoint!r}"
    try:
        answer = client.predict(deployment_name=deployment, df=frame, endpoint=endpoint)
    except Exception as exc:
        azure = _azure_error_in_chain(exc) or exc
        status = getattr(getattr(azure, "response", None), "status_code", None)
        text = _one_line(getattr(azure, "message", None) or azure) or type(azure).__name__
        # Azure's scoring script hides the model's exception behind a fixed text: say where the cause is.
        logs = f"az ml online-deployment get-logs -e {endpoint} -n {deployment}"
        raise DeployError(
            f"{what} failed: {'HTTP ' + str(status) + ': ' if status else ''}{text} (deployment log: {logs})"
        ) from None
    rows = answer.to_dict(orient="records") if hasattr(answer, "to_dict") else list(answer)
    if len(rows) != 1:
        raise DeployError(f"{what} failed: expected 1 answer for 1 photo, got {len(rows)}")
    row = rows[0]
    error = row.get("error")
    if isinstance(error, str) and error.strip():
        raise DeployError(f"{what} failed: the model answered error: {_one_line(error)}")
    if row.get("label") in (None, "") or (isinstance(row.get("label"), float) and row["label"] != row["label"]):
        raise DeployError(f"{what} failed: the answer has no label ({_one_line(json.dumps(row, default=str))[:200]})")
    return row


def _blue_green(client, name, model_uri, config_path, folder, photo, traffic, delete_old, endpoint_auth) -> dict:
    endpoint = _find_endpoint(client, name)
    created_endpoint = endpoint is None
    if created_endpoint:
        endpoint_file = write_config(build_endpoint_config(endpoint_auth), folder, "endpoint")
        log.info("creating managed online endpoint %r (%s auth)", name, endpoint_auth)
        endpoint = _call_plugin(
            f"creating endpoint {name!r}",
            client.create_endpoint,
            name,
            config={"endpoint-config-file": str(endpoint_file)},
        )
    before = _traffic_of(endpoint)
    existing = [
        d["name"] for d in _call_plugin(f"listing the deployments of {name!r}", client.list_deployments, endpoint=name)
    ]
    slot = choose_slot(before, existing)
    deploy_config = {"deploy-config-file": str(config_path)}
    if slot in existing:
        log.info("updating idle deployment %r of %r with %s (0%% traffic)", slot, name, model_uri)
        _call_plugin(
            f"updating deployment {slot!r}",
            client.update_deployment,
            slot,
            model_uri=model_uri,
            config=deploy_config,
            endpoint=name,
        )
    else:
        log.info("creating deployment %r of %r with %s (0%% traffic)", slot, name, model_uri)
        _call_plugin(
            f"creating deployment {slot!r}",
            client.create_deployment,
            slot,
            model_uri,
            config=deploy_config,
            endpoint=name,
        )
    try:
        answer = smoke_test(client, name, slot, photo)
    except DeployError as exc:
        raise DeployError(f"{exc}; traffic unchanged ({_traffic_text(before)})") from None
    log.info("smoke test of %r passed: %s", slot, answer.get("label"))
    after = split_traffic({**{d: 0 for d in existing}, **before}, slot, traffic)
    traffic_file = write_config(build_endpoint_config(traffic=after), folder, "traffic")
    endpoint = _call_plugin(
        f"moving traffic of {name!r} to {slot!r}",
        client.update_endpoint,
        name,
        config={"endpoint-config-file": str(traffic_file)},
    )
    deleted = []
    if delete_old:
        for old in existing:
            if old != slot and after.get(old, 0) == 0:
                _call_plugin(f"deleting old deployment {old!r}", client.delete_deployment, old, endpoint=name)
                deleted.append(old)
    properties = endpoint.get("properties") or {} if isinstance(endpoint, dict) else {}
    return {
        "action": "created endpoint" if created_endpoint else ("canary" if traffic < 100 else "switched"),
        "endpoint": name,
        "deployment": slot,
        "traffic_before": before,
        "traffic": _traffic_of(endpoint) or after,
        "deleted": deleted,
        "scoring_uri": properties.get("scoringUri"),
        "smoke_test": {k: answer[k] for k in ("label", "prob") if k in answer},
    }


def _deploy_local(model_uri, target, name, config) -> dict:
    import mlflow
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    from carclf.deployment.local_target import parse_config, validate_name

    try:
        validate_name(name)
        parse_config(config)
    except MlflowException as exc:
        raise DeployError(exc.message) from None
    if config.get("home"):
        # get/list take no config: name the state folder in the target URI so every call sees it.
        target = f"{LOCAL_TARGET}:{pathlib.Path(config.pop('home')).expanduser().resolve()}"
    client = get_deploy_client(target)
    from carclf.tracking.runs import log_new_params, step_run

    with step_run():
        log_new_params({"target": target, "name": name, "model_uri": model_uri})
        mlflow.log_dict(config, "deploy/local.json")
        if _exists(client, name):
            deployment = client.update_deployment(name, model_uri=model_uri, config=config)
            action = "updated"
        else:
            deployment = client.create_deployment(name, model_uri, config=config)
            action = "created"
        summary = _summary(deployment)
        mlflow.set_tags(
            {
                "carclf.deploy.action": action,
                "carclf.deploy.target": target,
                "carclf.deploy.url": deployment.get("url", ""),
            }
        )
        mlflow.log_dict(summary, "deploy/deployment.json")
    return {
        "name": name,
        "flavor": deployment.get("flavor", "python_function"),
        "target": target,
        "model_uri": model_uri,
        "action": action,
        "config_file": None,
        "deployment": summary,
    }


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
