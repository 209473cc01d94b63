"""Deploy a model to a target: an Azure ML workspace (``azure_target``) or this machine (`carclf-local`).

The deploy step's library side; ``entry_points.deploy`` declares the parameters and calls ``deploy_model``.
"""

from __future__ import annotations

import pathlib

from carclf.deployment.azure_preflight import is_azureml_target
from carclf.deployment.azure_target import deploy_azure
from carclf.deployment.errors import DeployError
from carclf.deployment.plugin_calls import deployment_exists, deployment_result, deployment_summary

# local_config.TARGET_NAME (tests/test_local_target.py checks they agree), not imported from there: that module
# loads MLflow, and the deploy CLI must answer a bad parameter or a missing Azure login in well under a second.
LOCAL_TARGET = "carclf-local"


def deploy_local(model_uri, target, name, config) -> dict:
    import mlflow
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    from carclf.deployment.local_config import parse_config, validate_name

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

    with step_run("deploy"):
        log_new_params({"target": target, "name": name, "model_uri": model_uri})
        mlflow.log_dict(config, "deploy/local.json")
        if deployment_exists(client, name):
            deployment = client.update_deployment(name, model_uri=model_uri, config=config)
            action = "updated"
        else:
            deployment = client.create_deployment(name, model_uri, config=config)
            action = "created"
        summary = deployment_summary(deployment)
        mlflow.set_tags(
            {
                "carclf.deploy.action": action,
                "carclf.deploy.target": target,
                "carclf.deploy.url": deployment.get("url", ""),
            }
        )
        mlflow.log_dict(summary, "deploy/deployment.json")
    return deployment_result(name, target, model_uri, action, deployment, summary, None)


def deploy_model(
    *,
    model_uri: str,
    target: str,
    name: str,
    kind: str,
    compute: str,
    traffic: int,
    delete_old: bool,
    smoke_image: str | None,
    endpoint_auth: str,
    cpu_cores: float,
    memory_gb: float,
    instance_type: str,
    instance_count: int,
    compute_cluster: str,
    mini_batch_size: int,
    max_concurrency: int,
    output_file_name: str,
    auth: str,
    config_dir: str | None,
    aks_compute: str,
    min_replicas: int,
    max_replicas: int,
    request_timeout: int,
    network_check: bool,
    port: int | None,
    workers: int | None,
    auth_enabled: bool,
    host: str | None,
    home: str | None,
    network_timeout_s: float,
) -> dict:
    """Deploy `model_uri` as `name` on `target` (an azureml://... workspace URI or `carclf-local[:/state]`).

    Every parameter is a field of ``entry_points.deploy.DeployConfig`` (its help says what it is); all are
    given, the defaults live there."""
    if not model_uri:
        raise DeployError("model_uri is empty: give e.g. models:/carclf/1")
    if not target:
        raise DeployError(f"target is empty: give an azureml://... workspace URI or {LOCAL_TARGET}")
    if is_azureml_target(target):
        return deploy_azure(
            model_uri,
            target,
            name,
            kind=kind,
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
                request_timeout_s=request_timeout,
                auth_enabled=auth_enabled,
            ),
            batch_kwargs=dict(
                compute_cluster=compute_cluster,
                instance_count=instance_count,
                mini_batch_size=mini_batch_size,
                max_concurrency_per_instance=max_concurrency,
                output_file_name=output_file_name,
            ),
            rollout=dict(traffic=traffic, delete_old=delete_old, smoke_image=smoke_image, endpoint_auth=endpoint_auth),
        )
    if (kind or "").strip().lower() == "batch":
        raise DeployError(
            f"kind=batch is an Azure ML batch endpoint: give an azureml://... workspace URI as target, not {target!r}"
        )
    if target.split(":", 1)[0] == LOCAL_TARGET:
        local_config = {"port": port, "workers": workers, "host": host, "home": home, "timeout": request_timeout}
        return deploy_local(
            model_uri, target, name, {k: str(v) for k, v in local_config.items() if v not in (None, "")}
        )
    raise DeployError(f"unsupported target {target!r}: use an azureml://... workspace URI or {LOCAL_TARGET}")
