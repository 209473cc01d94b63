"""Registered-model URIs for the `azureml` plugin: which forms it can deploy, and aliases/`latest` resolved to
a version number with the MLflow client (the plugin itself only understands numbers)."""

from __future__ import annotations

import logging
import os
import re

from carclf.deployment.errors import DeployError
from carclf.deployment.plugin_calls import one_line

log = logging.getLogger(__name__)

# models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>; <name> may be Unity Catalog's
# three-level catalog.schema.model.
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


def registered_model_parts(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, version or None, alias or None) of a registry URI; None for runs:/, paths and other URIs."""
    match = MODEL_URI.match(model_uri or "")
    return (match.group("name"), match.group("version"), match.group("alias")) if match else None


def stage_refusal(model_uri: str) -> str | None:
    """The one-line reason a ``models:/<name>/<Stage>`` URI is refused, or None for every other URI.

    Stages are deprecated in MLflow and do not exist in Unity Catalog, which has aliases instead."""
    parts = registered_model_parts(model_uri)
    if parts is None or parts[1] is None or parts[1].isdigit() or parts[1].lower() == "latest":
        return None
    name, stage = parts[0], parts[1]
    return (
        f"model_uri {model_uri!r} names a stage ({stage!r}); stages are deprecated in MLflow and Unity Catalog has "
        f"none: give a version (models:/{name}/<version>) or an alias (models:/{name}@<alias>, set with "
        "MlflowClient().set_registered_model_alias)"
    )


def check_azure_model_uri(model_uri: str) -> None:
    if reason := stage_refusal(model_uri):
        raise DeployError(reason)
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
    parts = registered_model_parts(model_uri)
    if parts is None:
        return model_uri
    if reason := stage_refusal(model_uri):
        raise DeployError(reason)
    name, version, alias = parts
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
