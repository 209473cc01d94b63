"""`carclf-local`: an MLflow deployment target that really runs `mlflow models serve` on this machine.

Registered in pyproject under the `mlflow.deployments` entry-point group, so the standard CLI works:

    mlflow deployments create  -t carclf-local --name cars -m models:/carclf/1 [-C port=5001 -C workers=2]
    mlflow deployments predict -t carclf-local --name cars --input-path req.json
    mlflow deployments update  -t carclf-local --name cars -m models:/carclf/2
    mlflow deployments get     -t carclf-local --name cars
    mlflow deployments list    -t carclf-local
    mlflow deployments delete  -t carclf-local --name cars

Each deployment is a detached `mlflow models serve` process group (it outlives the CLI that created it)
plus a JSON record in the state folder. With a public key (`-C public_key=pub.pem` or $CARCLF_MODEL_PUBLIC_KEY)
create/update/run-local download the model once, check it against its manifest and signature, and serve that
checked copy (kept under the state folder's `verified/` while the deployment lives); a tampered or unsigned
model is refused in one line and nothing is started. Health is always measured live: process alive (checked against
its recorded start time, so a recycled pid is not mistaken for ours) and `/ping` answering.
MLflow's plugin contract: this module holds exactly one BaseDeploymentClient subclass, plus top-level
`run_local` and `target_help`. Its pieces live beside it: `local_config` (names, `-C` options, the error),
`local_state` (the records), `local_server` (starting a server and waiting for /ping) and `process_group`
(liveness and stopping); the names other code used from here are re-exported.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)

from carclf.compute.ports import AddressInUse, check_address_free, free_port
from carclf.deployment.local_config import (
    CONFIG_KEYS,
    DEFAULTS,
    FLAVOR,
    NAME_PATTERN,
    TARGET_NAME,
    DeploymentError,
    one_line_errors,
    parse_config,
    validate_name,
)
from carclf.deployment.local_server import (
    log_tail,
    ping,
    serve_command,
    serving_env,
    serving_url,
    start_server,
    wait_until_serving,
)
from carclf.deployment.local_state import StateStore, default_home
from carclf.deployment.model_uri import registered_model_parts, stage_refusal
from carclf.deployment.process_group import process_alive, process_start_time, stop_process_group
from carclf.verification.model_check import ModelVerificationError, download_verified, public_key_from

__all__ = [
    "CONFIG_KEYS",
    "DEFAULTS",
    "FLAVOR",
    "NAME_PATTERN",
    "TARGET_NAME",
    "CarclfLocalDeploymentClient",
    "DeploymentError",
    "parse_config",
    "run_local",
    "stop_process_group",
    "target_help",
    "validate_name",
]

_logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _model_version_info(model_uri: str) -> dict:
    """Model name/version for registry URIs (aliases and 'latest' resolved now, so the record is exact)."""
    info = {}
    parts = registered_model_parts(model_uri)
    if parts is None:
        return info
    name, version, alias = parts
    info["model_name"] = name
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        if alias:
            info["model_version"] = str(client.get_model_version_by_alias(name, alias).version)
            info["model_alias"] = alias
        elif version and version.isdigit():
            info["model_version"] = version
        elif version and version.lower() == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            info["model_version"] = str(max(int(v.version) for v in versions)) if versions else None
    except Exception as exc:  # informational only: the server start is the real check
        _logger.debug("could not resolve %s: %s", model_uri, exc)
    return info


def _check_model(model_uri: str, flavor: str | None) -> None:
    """Fail in seconds (not after a server timeout) when the model is missing or cannot be served."""
    if flavor not in (None, "", FLAVOR):
        raise DeploymentError(
            f"target {TARGET_NAME} serves the {FLAVOR} flavor only, not {flavor!r}", INVALID_PARAMETER_VALUE
        )
    if reason := stage_refusal(model_uri):
        raise DeploymentError(reason, INVALID_PARAMETER_VALUE)
    from mlflow.models import get_model_info

    try:
        info = get_model_info(model_uri)
    except MlflowException as exc:
        raise DeploymentError(f"cannot load model {model_uri}: {exc.message}", RESOURCE_DOES_NOT_EXIST) from None
    except OSError as exc:
        raise DeploymentError(f"cannot load model {model_uri}: {exc}", RESOURCE_DOES_NOT_EXIST) from None
    if FLAVOR not in info.flavors:
        raise DeploymentError(
            f"model {model_uri} has no {FLAVOR} flavor (flavors: {', '.join(info.flavors)}); it cannot be served",
            INVALID_PARAMETER_VALUE,
        )


def _verified_copy(model_uri: str, public_key, folder: pathlib.Path) -> pathlib.Path | None:
    """With a key (config or $CARCLF_MODEL_PUBLIC_KEY): the checked copy of the model under ``folder``, which the
    server then loads, so what was checked is what runs. None without a key."""
    try:
        key = public_key_from(public_key)
        if key is None:
            return None
        folder.mkdir(parents=True)
        return download_verified(model_uri, folder, key).path
    except ModelVerificationError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise DeploymentError(f"refusing to serve {exc}", INVALID_PARAMETER_VALUE) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _remove_verified_copy(record: dict) -> None:
    if record.get("verified_copy"):
        shutil.rmtree(record["verified_copy"], ignore_errors=True)


def _versions() -> dict:
    import mlflow

    versions = {"mlflow_version": mlflow.__version__, "python": sys.version.split()[0]}
    with contextlib.suppress(ImportError):
        from carclf_flavor.version import __version__ as carclf_version

        versions["carclf_version"] = carclf_version
    return versions


def _server_env() -> dict:
    """The server resolves models:/ URIs itself: give it the tracking/registry URIs in force here."""
    import mlflow

    return serving_env(
        {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_REGISTRY_URI": mlflow.get_registry_uri()}
    )


# ----------------------------------------------------------------------------------------------- client
class CarclfLocalDeploymentClient(BaseDeploymentClient):
    """Deployments as local `mlflow models serve` processes. Target URI: `carclf-local` or
    `carclf-local:/abs/state/folder` (state folder; `-C home=...` on create/update/delete overrides it)."""

    def __init__(self, target_uri):
        super().__init__(target_uri)
        parsed = urllib.parse.urlparse(target_uri)
        self._uri_home = pathlib.Path(parsed.path) if parsed.scheme and parsed.path not in ("", "/") else None

    # -- state helpers
    def _store(self, config: dict | None = None) -> StateStore:
        home = (config or {}).get("home")
        if home:
            return StateStore(pathlib.Path(home).expanduser().resolve())
        if self._uri_home is not None:
            return StateStore(self._uri_home.expanduser().resolve())
        return StateStore(default_home().expanduser().resolve())

    def _start_server(
        self, store: StateStore, name: str, model_uri: str, settings: dict, avoid_port: int | None = None
    ) -> dict:
        """Start a detached server and wait for /ping. On failure: process group killed, MlflowException."""
        host = settings.get("host", DEFAULTS["host"])
        port = settings.get("port")
        if port is not None:
            if port == avoid_port:
                raise DeploymentError(
                    f"port {port} is still used by the running deployment {name!r}; a blue-green update starts "
                    "the new server before stopping the old one, so give another port (or none: a free one is "
                    "picked)",
                    INVALID_PARAMETER_VALUE,
                )
            try:
                check_address_free(host, port)
            except AddressInUse as exc:
                raise DeploymentError(str(exc), INVALID_PARAMETER_VALUE) from None
        else:
            port = free_port(host)
        workers = settings.get("workers", DEFAULTS["workers"])
        timeout = settings.get("timeout", DEFAULTS["timeout"])
        startup_timeout = settings.get("startup_timeout", DEFAULTS["startup_timeout"])
        store.ensure()
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        log_path = store.logs / f"{name}-{stamp}.log"
        public_key = settings.get("public_key")
        copy_folder = store.home / "verified" / f"{name}-{stamp}"
        checked = _verified_copy(model_uri, public_key, copy_folder)
        command = serve_command(checked or model_uri, host, port, workers, timeout)
        # Detached: the server outlives the CLI that started it (stop_process_group stops its whole tree).
        process = start_server(command, log_path, _server_env())
        start_time = process_start_time(process.pid)
        url = serving_url(host, port)
        reason = wait_until_serving(process, url, startup_timeout)
        if reason is not None:
            stop_process_group(process.pid, start_time, grace_s=5.0)
            with contextlib.suppress(Exception):
                process.wait(timeout=1)
            shutil.rmtree(copy_folder, ignore_errors=True)
            raise DeploymentError(
                f"deployment {name!r} of {model_uri} failed to start: {reason}. Server log {log_path}, last "
                f"lines:\n{log_tail(log_path)}"
            )
        return {
            "host": host,
            "port": port,
            "url": url,
            "pid": process.pid,
            "pid_start_time": start_time,
            "log_path": str(log_path),
            "workers": workers,
            "timeout": timeout,
            "startup_timeout": startup_timeout,
            "command": command,
            "public_key": str(public_key_from(public_key)) if checked is not None else None,
            "verified_copy": str(copy_folder) if checked is not None else None,
        }

    def _describe(self, record: dict) -> dict:
        alive = process_alive(record.get("pid", 0), record.get("pid_start_time"))
        if not alive:
            status, detail = "unhealthy", f"server process {record.get('pid')} is not running"
        else:
            problem = ping(record["url"], timeout=2.0)
            status, detail = (
                ("healthy", "process running, /ping OK")
                if problem is None
                else ("unhealthy", f"process {record['pid']} running but {problem}")
            )
        described = {k: v for k, v in record.items() if k not in ("command", "pid_start_time")}
        described.update(status=status, healthy=status == "healthy", health_detail=detail, flavor=FLAVOR)
        return described

    # -- MLflow deployment API
    @one_line_errors
    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        validate_name(name)
        settings = parse_config(config)
        store = self._store(settings)
        _check_model(model_uri, flavor)
        with store.lock(name):
            existing = store.read(name)
            if existing is not None:
                state = self._describe(existing)["status"]
                raise DeploymentError(
                    f"deployment {name!r} already exists ({state}, model {existing.get('model_uri')}); use "
                    f"`mlflow deployments update` to change it or `delete` first",
                    RESOURCE_ALREADY_EXISTS,
                )
            server = self._start_server(store, name, model_uri, settings)
            record = {
                "name": name,
                "flavor": FLAVOR,
                "model_uri": model_uri,
                **_model_version_info(model_uri),
                **server,
                **_versions(),
                "created_at": _now(),
                "updated_at": _now(),
                "home": str(store.home),
            }
            try:
                store.write(record)
            except BaseException:
                stop_process_group(server["pid"], server["pid_start_time"])
                _remove_verified_copy(server)
                raise
        _logger.info("deployment %s serving %s at %s (pid %s)", name, model_uri, server["url"], server["pid"])
        return self._describe(record)

    @one_line_errors
    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        validate_name(name)
        settings = parse_config(config)
        store = self._store(settings)
        with store.lock(name):
            old = store.read(name)
            if old is None:
                raise DeploymentError(
                    f"no deployment named {name!r} in {store.home}; create it first", RESOURCE_DOES_NOT_EXIST
                )
            new_uri = model_uri or old["model_uri"]
            _check_model(new_uri, flavor)
            # An update keeps checking signatures with the key the deployment was created with.
            keys = ("host", "workers", "timeout", "startup_timeout", "public_key")
            merged = {k: old[k] for k in keys if old.get(k) is not None}
            merged.update(settings)
            old_alive = process_alive(old.get("pid", 0), old.get("pid_start_time"))
            # Blue-green: the new server must be healthy before the record switches; the old one keeps
            # serving until then, and keeps serving if the new one fails.
            server = self._start_server(store, name, new_uri, merged, avoid_port=old["port"] if old_alive else None)
            record = {
                **{
                    k: v
                    for k, v in old.items()
                    if k not in ("model_name", "model_version", "model_alias", "model_stage")
                },
                "model_uri": new_uri,
                **_model_version_info(new_uri),
                **server,
                **_versions(),
                "updated_at": _now(),
                "previous_model_uri": old["model_uri"],
            }
            try:
                store.write(record)
            except BaseException:
                stop_process_group(server["pid"], server["pid_start_time"])
                _remove_verified_copy(server)
                raise
            stop_process_group(old.get("pid", 0), old.get("pid_start_time"))
            _remove_verified_copy(old)
            with contextlib.suppress(OSError):
                if old.get("log_path") and old["log_path"] != record["log_path"]:
                    os.unlink(old["log_path"])
        return self._describe(record)

    @one_line_errors
    def delete_deployment(self, name, config=None, endpoint=None):
        validate_name(name)
        settings = parse_config(config)
        store = self._store(settings)
        with store.lock(name):
            record = store.read(name)
            if record is None:
                # Deletion is idempotent (MLflow's contract): a retry after success is not an error.
                _logger.info("no deployment named %s in %s; nothing to delete", name, store.home)
                return
            stop_process_group(record.get("pid", 0), record.get("pid_start_time"))
            _remove_verified_copy(record)
            with contextlib.suppress(OSError):
                if record.get("log_path"):
                    os.unlink(record["log_path"])
            store.remove(name)

    @one_line_errors
    def list_deployments(self, endpoint=None):
        store = self._store()
        described = []
        for name in store.names():
            with contextlib.suppress(MlflowException):
                record = store.read(name)
                if record is not None:
                    described.append(self._describe(record))
        return described

    @one_line_errors
    def get_deployment(self, name, endpoint=None):
        validate_name(name)
        store = self._store()
        record = store.read(name)
        if record is None:
            raise DeploymentError(f"no deployment named {name!r} in {store.home}", RESOURCE_DOES_NOT_EXIST)
        return self._describe(record)

    @one_line_errors
    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """POST `inputs` (a DataFrame, e.g. an `image` column of base64 strings or raw bytes, or a ready
        request dict) to the deployment's /invocations; returns a PredictionsResponse."""
        import pandas as pd
        import requests

        name = validate_name(deployment_name or endpoint)
        record = self._store().read(name)
        if record is None:
            raise DeploymentError(f"no deployment named {name!r}", RESOURCE_DOES_NOT_EXIST)
        if not process_alive(record.get("pid", 0), record.get("pid_start_time")):
            raise DeploymentError(
                f"deployment {name!r} is not running (process {record.get('pid')} is gone); "
                f"`mlflow deployments update -t {TARGET_NAME} --name {name}` restarts it"
            )
        if isinstance(inputs, pd.DataFrame):
            frame = inputs.copy()
            for column in frame.columns:
                if frame[column].map(lambda v: isinstance(v, (bytes, bytearray))).any():
                    # The scoring server base64-decodes columns typed `binary` in the signature.
                    frame[column] = frame[column].map(
                        lambda v: base64.b64encode(v).decode("ascii") if isinstance(v, (bytes, bytearray)) else v
                    )
            body = '{"dataframe_split": ' + frame.to_json(orient="split", index=False) + "}"
        elif isinstance(inputs, dict):
            body = json.dumps(inputs)
        else:
            raise DeploymentError(
                f"inputs must be a pandas DataFrame or a request dict, got {type(inputs).__name__}",
                INVALID_PARAMETER_VALUE,
            )
        try:
            response = requests.post(
                record["url"] + "/invocations",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=record.get("timeout", DEFAULTS["timeout"]) + 10,
            )
        except requests.RequestException as exc:
            raise DeploymentError(f"deployment {name!r} at {record['url']} did not answer: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise DeploymentError(
                f"deployment {name!r} refused the request (HTTP {response.status_code}): {message.splitlines()[0] if message else ''}",
                INVALID_PARAMETER_VALUE if response.status_code < 500 else INTERNAL_ERROR,
            )
        return PredictionsResponse.from_json(response.text)

    # -- endpoints are not a concept of this target
    @one_line_errors
    def create_endpoint(self, name, config=None):
        raise DeploymentError(f"target {TARGET_NAME} has no endpoints; use deployments")


# ----------------------------------------------------------------------------------------------- plugin API
@one_line_errors
def run_local(name, model_uri, flavor=None, config=None):
    """Serve the model in the foreground (Ctrl-C stops it); no record is kept."""
    validate_name(name)
    settings = parse_config(config)
    _check_model(model_uri, flavor)
    host = settings.get("host", DEFAULTS["host"])
    port = settings.get("port") or 5000
    with tempfile.TemporaryDirectory(prefix="carclf-verified-") as folder:
        checked = _verified_copy(model_uri, settings.get("public_key"), pathlib.Path(folder, "model"))
        command = serve_command(
            checked or model_uri,
            host,
            port,
            settings.get("workers", DEFAULTS["workers"]),
            settings.get("timeout", DEFAULTS["timeout"]),
        )
        print(f"serving {model_uri} as {name!r} at {serving_url(host, port)} (Ctrl-C stops)", flush=True)
        try:
            result = subprocess.run(command, env=_server_env(), check=False)
        except KeyboardInterrupt:
            return None
    if result.returncode not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise DeploymentError(f"`mlflow models serve` exited with code {result.returncode}")
    return None


def target_help():
    return f"""Target `{TARGET_NAME}`: runs `mlflow models serve --env-manager local` on this machine as a detached
process that outlives the CLI, one per deployment name, and keeps a record per deployment.

Target URI: `{TARGET_NAME}` (state in $CARCLF_DEPLOY_HOME, default ~/.carclf/deployments) or
`{TARGET_NAME}:/abs/path/to/state` (use the same form for every command of a deployment).

Config (-C key=value) for create / update / run-local:
  port=N             port to listen on (default: a free port; update needs a different one than the running server)
  host=ADDR          interface (default 127.0.0.1)
  workers=N          uvicorn workers (default 1)
  timeout=S          request timeout in seconds (mlflow models serve -t, default 60)
  startup_timeout=S  how long create/update wait for /ping (default 180)
  home=DIR           state folder (also accepted by delete)
  public_key=PEM     serve only a model signed for this EC public key (default: $CARCLF_MODEL_PUBLIC_KEY);
                     an update keeps checking with the key the deployment was created with

create starts the server and waits for /ping (server log tail on failure, nothing recorded);
update is blue-green (new server healthy -> record switched -> old server stopped; a failed update leaves
the old one serving; the port changes); get/list report health live (dead processes show as unhealthy);
delete stops the process group and removes the record. Names: 1-63 of A-Z a-z 0-9 _ . -.
predict: --input-path takes JSON pandas reads, e.g. {{"image": ["<base64 jpeg>", ...]}}."""
