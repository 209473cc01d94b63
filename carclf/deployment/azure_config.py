"""The config files MLflow's `azureml` plugin reads: the deployment (managed online, or the legacy ACI/AKS web
services) and the managed endpoint (auth, traffic). The checked-in examples under deploy/ are these defaults
(tests/test_deploy.py refuses drift); files are written whole or not at all (``carclf.files.atomic``).
"""

from __future__ import annotations

import json
import pathlib

from carclf.deployment.errors import DeployError
from carclf.files.atomic import write_text_atomic

COMPUTE_CHOICES = ("managed", "aci", "aks")
# online: a REST endpoint (managed, or the legacy ACI/AKS services); batch: a batch endpoint for folders.
KIND_CHOICES = ("online", "batch")
LEGACY_COMPUTE = ("aci", "aks")
# The flavor reads CARCLF_ERRORS as the default of its `errors` param: Azure's no-code scoring script
# answers any exception with HTTP 500 and a fixed text, so on Azure a bad photo gets a per-row `error`.
# Current models choose coerce there by themselves; models saved with `errors: raise` in their model_config
# (and their own older code) only through this variable.
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
    """Write `<compute>.json` under a partial name and rename it, so a reader never sees half a file."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(folder / f"{compute}.json", render_config(config))
