"""The `carclf-local` target's names, its `-C key=value` options and the one-line error it raises.

Shared by the plugin (``local_target``), its state records (``local_state``) and the deploy step's local path.
"""

from __future__ import annotations

import functools
import pathlib
import re

import click
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

TARGET_NAME = "carclf-local"
FLAVOR = "python_function"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
CONFIG_KEYS = {"port", "workers", "timeout", "host", "home", "startup_timeout", "public_key"}
DEFAULTS = {"host": "127.0.0.1", "workers": 1, "timeout": 60, "startup_timeout": 180}


class DeploymentError(MlflowException, click.ClickException):
    """What the plugin raises: an MlflowException that the `mlflow deployments` CLI shows as ONE line.

    mlflow/deployments/cli.py calls the plugin without any ``try``; click's ``main`` turns only a
    ``click.ClickException`` into ``Error: <message>`` (exit 1) and lets everything else, MlflowException
    included, escape as a 28-line Python traceback. Being both keeps API callers' ``except MlflowException``
    working and gives the CLI its one line.
    """

    def __init__(self, message, error_code=INTERNAL_ERROR, **kwargs):
        # MlflowException.__init__ ends in super().__init__(message): ClickException's, next in the MRO.
        MlflowException.__init__(self, message, error_code, **kwargs)


def one_line_errors(method):
    """Errors MLflow raises inside a plugin call leave it as DeploymentError too (one CLI line)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except DeploymentError:
            raise
        except MlflowException as exc:
            raise DeploymentError(exc.message, getattr(databricks_pb2, exc.error_code, INTERNAL_ERROR)) from None

    return wrapper


def validate_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in {".", ".."}:
        raise DeploymentError(
            f"invalid deployment name {name!r}: use 1-63 characters from A-Z a-z 0-9 _ . -, starting with a "
            "letter or digit (no slashes or path tricks)",
            error_code=INVALID_PARAMETER_VALUE,
        )
    return name


def _int_config(config: dict, key: str, minimum: int, maximum: int | None = None) -> int | None:
    value = config.get(key)
    if value is None or value == "":
        return None
    try:
        number = float(value)
        if not number.is_integer():
            raise ValueError
        number = int(number)
    except (TypeError, ValueError):
        raise DeploymentError(f"config {key}={value!r} is not an integer", INVALID_PARAMETER_VALUE) from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise DeploymentError(f"config {key}={number} must be {bound}", INVALID_PARAMETER_VALUE)
    return number


def parse_config(config: dict | None) -> dict:
    """Validate `-C key=value` options (all arrive as strings from the CLI)."""
    config = dict(config or {})
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise DeploymentError(
            f"unknown config key(s) {', '.join(unknown)} for target {TARGET_NAME}; "
            f"known: {', '.join(sorted(CONFIG_KEYS))}",
            INVALID_PARAMETER_VALUE,
        )
    parsed = {}
    port = _int_config(config, "port", 1, 65535)
    if port is not None:
        parsed["port"] = port
    for key, minimum in (("workers", 1), ("timeout", 1), ("startup_timeout", 1)):
        number = _int_config(config, key, minimum)
        if number is not None:
            parsed[key] = number
    if config.get("host"):
        parsed["host"] = str(config["host"]).strip()
    if config.get("home"):
        parsed["home"] = str(config["home"])
    if config.get("public_key"):
        parsed["public_key"] = str(pathlib.Path(str(config["public_key"])).expanduser().resolve())
    return parsed
