"""Azure ML batch endpoint for folders of photos: endpoint + deployment created or updated, never duplicated.

Goes through the REST client that ships inside azureml-mlflow (the same API version, credential, cloud and
transport as the online rollout), not azure-ai-ml: azure-ai-ml's current releases need azure-monitor-opentelemetry,
which pins OpenTelemetry below the version MLflow's tracing installs, and the newest release that resolves
beside MLflow 3.15 is from 2024. The calls are the ones azure-ai-ml makes for a ModelBatchDeployment with a
scoring script: the compute cluster is looked up (a missing one is named, not created: it costs money),
``azure_batch_code/`` is uploaded to the workspace's default blob datastore and registered as a code version,
an environment version is built from the model's own conda.yaml plus ``azureml-core`` (which Azure's batch
runtime needs), then the endpoint (Entra ID auth) and its deployment are PUT and the deployment made the
endpoint's default. Code and environment versions are named by their content, so a repeated deploy reuses them.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import re

from carclf.deployment.errors import DeployError
from carclf.deployment.plugin_calls import azure_error_in_chain, is_not_found, one_line

log = logging.getLogger(__name__)

CODE_FOLDER = pathlib.Path(__file__).with_name("azure_batch_code")
SCORING_SCRIPT = "score.py"
DEPLOYMENT_NAME = "carclf"
CODE_NAME = "carclf-batch-score"
ENVIRONMENT_NAME = "carclf-batch"
# Azure's CPU base image for environments built from a conda file (the one its batch examples use).
BASE_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
BATCH_RUNTIME_PACKAGES = ("azureml-core",)
_CLUSTER = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")
_OUTPUT_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def build_batch_config(
    compute_cluster: str = "cpu-cluster",
    instance_count: int = 1,
    mini_batch_size: int = 10,
    max_concurrency_per_instance: int = 1,
    output_file_name: str = "predictions.csv",
    max_retries: int = 3,
    retry_timeout_s: int = 300,
) -> dict:
    """The batch deployment's settings, checked offline (written to batch.json and logged to the run)."""
    cluster = (compute_cluster or "").strip()
    if not _CLUSTER.match(cluster):
        raise DeployError(
            f"compute_cluster {compute_cluster!r}: give the name of an Azure ML compute cluster in the workspace "
            "(3-32 letters, digits or dashes; az ml compute list --type amlcompute)"
        )
    for label, value, low in (
        ("instance_count", instance_count, 1),
        ("mini_batch_size", mini_batch_size, 1),
        ("max_concurrency_per_instance", max_concurrency_per_instance, 1),
        ("max_retries", max_retries, 0),
        ("retry_timeout_s", retry_timeout_s, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DeployError(f"{label} must be a whole number >= {low}, got {value!r}")
    if not _OUTPUT_FILE.match(output_file_name or "") or output_file_name in (".", ".."):
        raise DeployError(f"output_file_name {output_file_name!r}: give a file name such as predictions.csv")
    return {
        "compute": cluster,
        "instance_count": instance_count,
        "mini_batch_size": mini_batch_size,
        "max_concurrency_per_instance": max_concurrency_per_instance,
        "output_action": "append_row",
        "output_file_name": output_file_name,
        "retry_settings": {"max_retries": max_retries, "timeout_s": retry_timeout_s},
        "error_threshold": -1,  # a file that fails is a row with `error`, never a reason to stop the job
        "code_configuration": {"code": CODE_FOLDER.name, "scoring_script": SCORING_SCRIPT},
    }


def _raise_as_deploy_error(what: str, exc: Exception):
    """Azure's error anywhere in ``exc``'s chain as one DeployError line; anything else as it is."""
    azure = azure_error_in_chain(exc)
    if azure is None:
        raise exc
    raise DeployError(f"{what}: {type(azure).__name__}: {one_line(getattr(azure, 'message', None) or azure)}") from None


def _call(what: str, fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
        return result.result() if hasattr(result, "result") and hasattr(result, "done") else result
    except Exception as exc:
        _raise_as_deploy_error(what, exc)


def _get_or_none(what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        if is_not_found(exc):
            return None
        _raise_as_deploy_error(what, exc)


def code_bytes() -> bytes:
    return (CODE_FOLDER / SCORING_SCRIPT).read_bytes()


def environment_conda(model_uri: str) -> str:
    """The model's conda.yaml with Azure's batch runtime added to its pip list."""
    import mlflow.pyfunc
    import yaml

    path = mlflow.pyfunc.get_model_dependencies(model_uri, format="conda")
    conda = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    dependencies = conda.setdefault("dependencies", [])
    pip = next((d for d in dependencies if isinstance(d, dict) and "pip" in d), None)
    if pip is None:
        pip = {"pip": []}
        dependencies.extend(["pip", pip])
    names = {re.split(r"[<>=!~\[; ]", str(p), maxsplit=1)[0].lower() for p in pip["pip"]}
    pip["pip"].extend(p for p in BATCH_RUNTIME_PACKAGES if p not in names)
    conda["name"] = ENVIRONMENT_NAME
    return yaml.safe_dump(conda, sort_keys=False)


def _upload_code(rest, group: str, workspace: str, data: bytes, digest: str) -> str:
    """Upload the scoring script to the workspace's default blob datastore; returns the folder's URL."""
    from azure.storage.blob import BlobServiceClient

    store = _call(
        "reading the workspace's default datastore", rest.datastores.get, group, workspace, "workspaceblobstore"
    )
    props = store.properties
    secrets = _call("reading the datastore's key", rest.datastores.list_secrets, group, workspace, "workspaceblobstore")
    account_url = f"{props.protocol or 'https'}://{props.account_name}.blob.{props.endpoint or 'core.windows.net'}"
    folder = f"LocalUpload/{CODE_NAME}/{digest}"
    service = BlobServiceClient(account_url, credential=getattr(secrets, "key", None))
    blob = service.get_blob_client(props.container_name, f"{folder}/{SCORING_SCRIPT}")
    _call("uploading the scoring script", blob.upload_blob, data, overwrite=True)
    return f"{account_url}/{props.container_name}/{folder}"


def deploy_batch(client, target, name: str, model_uri: str, config: dict) -> dict:
    """Create or update batch endpoint `name` and its deployment of `model_uri` (models:/<name>/<version>)."""
    from azureml.mlflow._restclient.mfe_v2022_02_01_preview import models as m

    rest = client._mir_client._client
    group, workspace = target.resource_group, target.workspace
    model_name, model_version = model_uri[len("models:/") :].rsplit("/", 1)
    prefix = (
        f"/subscriptions/{target.subscription_id}/resourceGroups/{group}/providers/"
        f"Microsoft.MachineLearningServices/workspaces/{workspace}"
    )
    cluster = config["compute"]
    if _get_or_none(f"looking up compute cluster {cluster!r}", rest.compute.get, group, workspace, cluster) is None:
        raise DeployError(
            f"compute cluster {cluster!r} does not exist in workspace {workspace!r}: create it "
            f"(az ml compute create -n {cluster} --type amlcompute --size Standard_DS3_v2 --min-instances 0 "
            "--max-instances 4) or pass compute_cluster=<an existing cluster>"
        )
    location = _call("reading the workspace", rest.workspaces.get, group, workspace).location

    data = code_bytes()
    code_version = hashlib.sha256(data).hexdigest()[:16]
    code = _get_or_none(
        "looking up the scoring code", rest.code_versions.get, group, workspace, CODE_NAME, code_version
    )
    if code is None:
        code_uri = _upload_code(rest, group, workspace, data, code_version)
        code = _call(
            "registering the scoring code",
            rest.code_versions.create_or_update,
            group,
            workspace,
            CODE_NAME,
            code_version,
            m.CodeVersionData(properties=m.CodeVersionDetails(code_uri=code_uri, tags={"project": "carclf"})),
        )
    conda = environment_conda(model_uri)
    env_version = hashlib.sha256((BASE_IMAGE + conda).encode()).hexdigest()[:16]
    _call(
        "registering the batch environment",
        rest.environment_versions.create_or_update,
        group,
        workspace,
        ENVIRONMENT_NAME,
        env_version,
        m.EnvironmentVersionData(
            properties=m.EnvironmentVersionDetails(image=BASE_IMAGE, conda_file=conda, tags={"project": "carclf"})
        ),
    )

    endpoint = _get_or_none(f"looking up batch endpoint {name!r}", rest.batch_endpoints.get, group, workspace, name)
    created_endpoint = endpoint is None
    if created_endpoint:
        log.info("creating batch endpoint %r", name)
        endpoint = _call(
            f"creating batch endpoint {name!r}",
            rest.batch_endpoints.begin_create_or_update,
            group,
            workspace,
            name,
            m.BatchEndpointData(
                location=location,
                tags={"project": "carclf"},
                properties=m.BatchEndpointDetails(auth_mode="AADToken", description="carclf: car photos, batch"),
            ),
        )
    existing = _get_or_none(
        f"looking up deployment {DEPLOYMENT_NAME!r}",
        rest.batch_deployments.get,
        group,
        workspace,
        name,
        DEPLOYMENT_NAME,
    )
    retry = config["retry_settings"]
    log.info(
        "%s batch deployment %r of %r with %s", "updating" if existing else "creating", DEPLOYMENT_NAME, name, model_uri
    )
    _call(
        f"{'updating' if existing else 'creating'} batch deployment {DEPLOYMENT_NAME!r}",
        rest.batch_deployments.begin_create_or_update,
        group,
        workspace,
        name,
        DEPLOYMENT_NAME,
        m.BatchDeploymentData(
            location=location,
            tags={"project": "carclf"},
            properties=m.BatchDeploymentDetails(
                model=m.IdAssetReference(asset_id=f"{prefix}/models/{model_name}/versions/{model_version}"),
                code_configuration=m.CodeConfiguration(code_id=code.id, scoring_script=SCORING_SCRIPT),
                environment_id=f"{prefix}/environments/{ENVIRONMENT_NAME}/versions/{env_version}",
                compute=f"{prefix}/computes/{cluster}",
                resources=m.ResourceConfiguration(instance_count=config["instance_count"]),
                mini_batch_size=config["mini_batch_size"],
                max_concurrency_per_instance=config["max_concurrency_per_instance"],
                output_action=m.BatchOutputAction.APPEND_ROW,  # "append_row" in the CLI's YAML
                output_file_name=config["output_file_name"],
                error_threshold=config["error_threshold"],
                retry_settings=m.BatchRetrySettings(
                    max_retries=retry["max_retries"], timeout=_duration(retry["timeout_s"])
                ),
                logging_level="Info",
            ),
        ),
    )
    defaults = getattr(endpoint.properties, "defaults", None)
    if getattr(defaults, "deployment_name", None) != DEPLOYMENT_NAME:
        endpoint = _call(
            f"making {DEPLOYMENT_NAME!r} the default deployment of {name!r}",
            rest.batch_endpoints.begin_update,
            group,
            workspace,
            name,
            m.PartialBatchEndpointPartialTrackedResource(
                properties=m.PartialBatchEndpoint(defaults=m.BatchEndpointDefaults(deployment_name=DEPLOYMENT_NAME))
            ),
        )
    scoring_uri = getattr(endpoint.properties, "scoring_uri", None)
    return {
        "action": "created endpoint" if created_endpoint else ("updated" if existing else "created deployment"),
        "kind": "batch",
        "endpoint": name,
        "deployment": DEPLOYMENT_NAME,
        "compute": cluster,
        "scoring_uri": scoring_uri,
        "code": code.id,
        "environment": f"{ENVIRONMENT_NAME}:{env_version}",
        "invoke": (
            f"python -m entry_points.score --azure-batch-endpoint {scoring_uri or '<scoring URI>'} "
            "--input azureml://datastores/<datastore>/paths/<folder>/"
        ),
    }


def _duration(seconds: int):
    import datetime

    return datetime.timedelta(seconds=seconds)
