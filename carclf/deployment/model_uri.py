"""Registered-model URIs for the `azureml` plugin: which forms it can deploy, and aliases/`latest` resolved to
a version number with the MLflow client (the plugin itself only understands numbers)."""

from __future__ import annotations

import logging
import os
import re

from carclf.deployment.errors import DeployError
from carclf.deployment.plugin_calls import one_line

log = logging.getLogger(__name__)

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


def check_azure_model_uri(model_uri: str) -> None:
    if MODEL_URI.match(model_uri or ""):
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
    match = MODEL_URI.match(model_uri or "")
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
            f"model_uri {model_uri!r}: cannot resolve {what} of registered model {name!r} ({one_line(exc.message)})"
        ) from None
    resolved_uri = f"models:/{name}/{resolved}"
    log.info("%s is %s", model_uri, resolved_uri)
    return resolved_uri
