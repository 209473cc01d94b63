"""Calling an MLflow deployment plugin (`azureml`, `carclf-local`) from the deploy step: Azure SDK failures
anywhere in an exception chain become one line, credential hints go in as environment defaults for the length
of the call, and what a deployment is gets summarised without keys or tokens."""

from __future__ import annotations

import contextlib
import os

from carclf.deployment.errors import DeployError


@contextlib.contextmanager
def env_defaults(values: dict):
    """Set environment variables the user has not set, for the duration of the deployment call."""
    added = [key for key, value in values.items() if value and key not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def narrowed_credential_env(token_credentials: str) -> dict:
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


def azure_error_in_chain(exc: BaseException):
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


def one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.strip().startswith("To mitigate")]
    return " ".join(lines[:3])


def call_plugin(what: str, fn, *args, **kwargs):
    """Run a plugin call; an Azure SDK failure anywhere in the exception chain becomes one DeployError line
    (azureml-mlflow 1.62 sometimes masks it, e.g. with an AttributeError on a response-less HttpResponseError)."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        azure = azure_error_in_chain(exc)
        if azure is None:
            raise
        raise DeployError(f"{what}: {one_line(exc.message)} ({type(azure).__name__}: {one_line(azure)})") from None
    except Exception as exc:
        azure = azure_error_in_chain(exc)
        if azure is None:
            raise
        raise DeployError(f"{what}: {type(azure).__name__}: {one_line(azure)}") from None


def deployment_exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        call_plugin(f"looking up deployment {name!r}", client.get_deployment, name)
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


def deployment_summary(deployment: dict) -> dict:
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


def is_not_found(exc: BaseException) -> bool:
    """The Azure SDK answered 404 somewhere in the chain."""
    azure = azure_error_in_chain(exc)
    response = getattr(azure, "response", None)
    return getattr(azure, "status_code", None) == 404 or getattr(response, "status_code", None) == 404


def deployment_result(
    name: str, target: str, model_uri: str, action: str, deployment: dict, summary: dict, config_file: str | None
) -> dict:
    """What `deploy` returns (and prints) for any target; ``summary`` is ``deployment_summary(deployment)``."""
    return {
        "name": name,
        "flavor": deployment.get("flavor", "python_function"),
        "target": target,
        "model_uri": model_uri,
        "action": action,
        "config_file": config_file,
        "deployment": summary,
    }
