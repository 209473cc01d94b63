"""Deploy a registered model to an Azure ML workspace through MLflow's `azureml` plugin (azureml-mlflow).

Order matters: everything that can be checked offline first (plugin installed, name, target URI, model URI,
config, rollout parameters), then the credential source and the network (``azure_preflight``), and only then
anything written, tracked or sent. kind=batch creates or updates a batch endpoint (``azure_batch``);
compute=managed (the online default) rolls out blue/green (``blue_green``);
compute=aci|aks (SDK v1 web services, support ended 2026-06-30) create or update the web service `name`.
"""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
import tempfile

from carclf.deployment.azure_batch import build_batch_config, deploy_batch
from carclf.deployment.azure_config import KIND_CHOICES, build_deploy_config, write_config
from carclf.deployment.azure_preflight import check_reachable, find_credential, parse_target
from carclf.deployment.blue_green import check_rollout, roll_out
from carclf.deployment.errors import DeployError
from carclf.deployment.model_uri import check_azure_model_uri, registered_model_parts, resolve_model_uri
from carclf.deployment.plugin_calls import (
    call_plugin,
    deployment_exists,
    deployment_result,
    deployment_summary,
    env_defaults,
    narrowed_credential_env,
)

log = logging.getLogger(__name__)

# Azure names web services / online endpoints: 3-32 characters, lower-case letters, digits and dashes,
# starting with a letter and not ending with a dash (unique per region for managed endpoints).
AZURE_NAME = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")


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


def deploy_azure(
    model_uri,
    target,
    name,
    kind,
    compute,
    auth,
    config_dir,
    network_check,
    network_timeout_s,
    config_kwargs,
    batch_kwargs,
    rollout,
) -> dict:
    # 1. Everything that can be checked offline, before anything is written or sent.
    _check_azure_plugin_installed()
    if not AZURE_NAME.match(name or ""):
        raise DeployError(
            f"name {name!r}: Azure needs 3-32 lower-case letters, digits or dashes, starting with a letter "
            "and not ending with a dash"
        )
    azure_target = parse_target(target)
    check_azure_model_uri(model_uri)
    kind = (kind or "").strip().lower()
    if kind not in KIND_CHOICES:
        raise DeployError(f"kind must be one of {', '.join(KIND_CHOICES)}, got {kind!r}")
    batch = kind == "batch"
    compute = "batch" if batch else (compute or "").strip().lower()
    config = build_batch_config(**batch_kwargs) if batch else build_deploy_config(compute, **config_kwargs)
    managed = compute == "managed"
    # A batch job reads files, not requests: no smoke photo, and no online scorer that must boot.
    if managed:
        smoke_photo = check_rollout(**rollout)
    elif not batch:
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
    if not batch:
        _check_azure_scorer_can_boot(model_uri)
    elif registered_model_parts(model_uri) is None:
        raise DeployError(
            f"model_uri {model_uri!r}: a batch deployment needs a registered model: give models:/<name>/<version> "
            "or models:/<name>@<alias>"
        )
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

        with step_run("deploy"):
            log_new_params(
                {
                    "target": target,
                    "name": name,
                    "model_uri": model_uri,
                    "compute": compute,
                    "kind": kind,
                    "auth": credential.kind,
                    **({"traffic": rollout["traffic"]} if managed else {}),
                }
            )
            mlflow.log_artifact(str(config_path), artifact_path="deploy")
            with env_defaults(
                {"AZUREML_CURRENT_CLOUD": azure_target.cloud, **narrowed_credential_env(credential.token_credentials)}
            ):
                client = call_plugin("building the azureml deployment client", get_deploy_client, target)
                if batch:
                    result = deploy_batch(client, azure_target, name, model_uri, config)
                    mlflow.log_dict(result, "deploy/batch_result.json")
                    mlflow.set_tags(
                        {
                            "carclf.deploy.action": result["action"],
                            "carclf.deploy.target": target,
                            "carclf.deploy.kind": "batch",
                            "carclf.deploy.url": result["scoring_uri"] or "",
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
                if managed:
                    result = roll_out(
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
                if deployment_exists(client, name):
                    call_plugin(
                        f"updating {name!r}", client.update_deployment, name, model_uri=model_uri, config=deploy_config
                    )
                    action = "updated"
                    deployment = call_plugin(f"reading back {name!r}", client.get_deployment, name)
                else:
                    deployment = call_plugin(
                        f"creating {name!r}", client.create_deployment, name, model_uri, config=deploy_config
                    )
                    action = "created"
            summary = deployment_summary(deployment)
            mlflow.set_tags({"carclf.deploy.action": action, "carclf.deploy.target": target})
            mlflow.log_dict(summary, "deploy/deployment.json")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    config_file = str(config_path) if scratch is None else None
    return deployment_result(name, target, model_uri, action, deployment, summary, config_file)
