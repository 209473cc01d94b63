"""Checks that run before the deploy step talks to Azure: target URI, credential source, reachability.

Everything here is standard library only and makes no network call except `check_reachable`, which opens
plain TCP connections (no Azure API, no token) with short timeouts. The azureml plugin itself gives no
early signal: it builds a credential chain that ends in an interactive browser / device-code login and
only authenticates at its first REST call, so a missing login would otherwise surface minutes later (or
hang waiting for a device code). `find_credential` therefore decides up front, from environment variables
and files alone, which credential the deployment will use.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import time
import urllib.parse

AUTH_CHOICES = ("auto", "service_principal", "cli", "managed_identity")

# Host suffix of the workspace API -> (cloud name the azureml plugin knows, ARM host, Entra ID login host).
CLOUDS = {
    "api.azureml.ms": ("AzureCloud", "management.azure.com", "login.microsoftonline.com"),
    "api.ml.azure.us": ("AzureUSGovernment", "management.usgovcloudapi.net", "login.microsoftonline.us"),
    "api.ml.azure.cn": ("AzureChinaCloud", "management.chinacloudapi.cn", "login.chinacloudapi.cn"),
}

_HOW_TO_GET_URI = (
    "copy the workspace's MLflow tracking URI from `az ml workspace show -n <ws> -g <rg> "
    "--query mlflow_tracking_uri -o tsv` (or Workspace.get_mlflow_tracking_uri())"
)
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_RESOURCE_GROUP = re.compile(r"^[-\w.()]{1,90}$")
_WORKSPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{1,32}$")
_REGION_HOST = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


class PreflightError(Exception):
    """A problem found before any call to Azure; the message is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class AzureTarget:
    uri: str
    host: str
    region: str
    subscription_id: str
    resource_group: str
    workspace: str
    cloud: str
    arm_host: str
    login_host: str


@dataclasses.dataclass(frozen=True)
class CredentialSource:
    kind: str  # service_principal | cli | managed_identity
    detail: str
    # azure-identity's DefaultAzureCredential honours AZURE_TOKEN_CREDENTIALS: naming the credential the
    # preflight chose keeps the plugin from probing the others (e.g. the IMDS metadata address).
    token_credentials: str


def is_azureml_target(target: str) -> bool:
    return target.strip().lower().startswith("azureml:")


def parse_target(uri: str) -> AzureTarget:
    """Validate an `azureml://<region>.api.azureml.ms/mlflow/v1.0/subscriptions/...` workspace URI."""
    if not uri or not uri.strip():
        raise PreflightError(f"target is empty: {_HOW_TO_GET_URI}")
    uri = uri.strip()
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "azureml":
        raise PreflightError(f"target {uri!r} is not an azureml:// workspace URI: {_HOW_TO_GET_URI}")
    host = (parsed.hostname or "").lower()
    suffix = next((s for s in CLOUDS if host.endswith("." + s)), None)
    if suffix is None or not _REGION_HOST.match(host[: -len(suffix) - 1]):
        known = ", ".join("<region>." + s for s in CLOUDS)
        raise PreflightError(
            f"target {uri!r}: host {host or '(none)'!r} is not an Azure ML workspace API host ({known}): "
            f"{_HOW_TO_GET_URI}"
        )
    parts = [p for p in parsed.path.split("/") if p]
    expected = [
        "mlflow",
        "v1.0",
        "subscriptions",
        None,
        "resourceGroups",
        None,
        "providers",
        "Microsoft.MachineLearningServices",
        "workspaces",
        None,
    ]
    labels = [
        "mlflow",
        "v1.0",
        "subscriptions",
        "<subscription-id>",
        "resourceGroups",
        "<resource-group>",
        "providers",
        "Microsoft.MachineLearningServices",
        "workspaces",
        "<workspace>",
    ]
    for index, want in enumerate(expected):
        if index >= len(parts):
            raise PreflightError(
                f"target {uri!r} is missing /{'/'.join(labels[index:])} in its path: {_HOW_TO_GET_URI}"
            )
        if want is not None and parts[index].lower() != want.lower():
            raise PreflightError(
                f"target {uri!r}: expected {want!r} at path segment {index + 1}, found {parts[index]!r}: "
                f"{_HOW_TO_GET_URI}"
            )
    if len(parts) > len(expected):
        raise PreflightError(
            f"target {uri!r} has extra path segments after the workspace name "
            f"({'/'.join(parts[len(expected) :])}): {_HOW_TO_GET_URI}"
        )
    subscription, group, workspace = parts[3], parts[5], parts[9]
    if not _GUID.match(subscription):
        raise PreflightError(f"target {uri!r}: subscription id {subscription!r} is not a GUID: {_HOW_TO_GET_URI}")
    if not _RESOURCE_GROUP.match(group):
        raise PreflightError(f"target {uri!r}: resource group {group!r} is not a valid name: {_HOW_TO_GET_URI}")
    if not _WORKSPACE.match(workspace):
        raise PreflightError(f"target {uri!r}: workspace name {workspace!r} is not valid: {_HOW_TO_GET_URI}")
    cloud, arm_host, login_host = CLOUDS[suffix]
    return AzureTarget(
        uri=uri,
        host=host,
        region=host.split(".")[0],
        subscription_id=subscription.lower(),
        resource_group=group,
        workspace=workspace,
        cloud=cloud,
        arm_host=arm_host,
        login_host=login_host,
    )


def _service_principal(env) -> tuple[CredentialSource | None, list[str]]:
    """Returns (source, missing variable names). Secret or certificate, as EnvironmentCredential accepts."""
    missing = [v for v in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID") if not env.get(v, "").strip()]
    certificate = env.get("AZURE_CLIENT_CERTIFICATE_PATH", "").strip()
    has_secret = bool(env.get("AZURE_CLIENT_SECRET", "").strip())
    if not has_secret and not certificate:
        missing.append("AZURE_CLIENT_SECRET")
    if certificate and not has_secret and not os.path.isfile(certificate):
        raise PreflightError(
            f"AZURE_CLIENT_CERTIFICATE_PATH points to {certificate!r}, which does not exist: "
            "fix the path or set AZURE_CLIENT_SECRET instead"
        )
    if missing:
        return None, missing
    how = "client secret" if has_secret else f"certificate {certificate}"
    return CredentialSource(
        kind="service_principal",
        detail=f"service principal {env['AZURE_CLIENT_ID'].strip()} in tenant {env['AZURE_TENANT_ID'].strip()} ({how})",
        token_credentials="EnvironmentCredential",
    ), []


def _azure_cli(env, subscription_id: str | None) -> tuple[CredentialSource | None, str]:
    """Returns (source, why not). Looks at the CLI's files only; never runs `az` (that may call Azure)."""
    az = shutil.which("az", path=env.get("PATH"))
    if az is None:
        return None, "the Azure CLI (`az`) is not on PATH"
    config_dir = pathlib.Path(env.get("AZURE_CONFIG_DIR") or pathlib.Path.home() / ".azure")
    profile_path = config_dir / "azureProfile.json"
    if not profile_path.is_file():
        return None, f"`az` is installed but not logged in (no {profile_path})"
    try:
        # The CLI writes this file with a UTF-8 byte order mark.
        profile = json.loads(profile_path.read_text(encoding="utf-8-sig") or "{}")
    except (OSError, ValueError) as exc:
        return None, f"{profile_path} is unreadable ({exc}); run `az login` again"
    subscriptions = profile.get("subscriptions") or []
    if not subscriptions:
        return None, f"`az` is not logged in ({profile_path} lists no subscriptions)"
    caches = [config_dir / n for n in ("msal_token_cache.json", "msal_token_cache.bin", "accessTokens.json")]
    if not any(p.is_file() and p.stat().st_size > 0 for p in caches):
        return None, f"`az` has a profile but no token cache in {config_dir} (logged out?)"
    users = sorted({(s.get("user") or {}).get("name", "?") for s in subscriptions})
    detail = f"Azure CLI login ({', '.join(users)}; {az})"
    if subscription_id and not any(str(s.get("id", "")).lower() == subscription_id for s in subscriptions):
        detail += f"; note: subscription {subscription_id} is not in the CLI profile"
    return CredentialSource(kind="cli", detail=detail, token_credentials="AzureCliCredential"), ""


def find_credential(auth: str = "auto", target: AzureTarget | None = None, env=None) -> CredentialSource:
    """Decide which credential source the deployment will use, from environment variables and files only."""
    env = os.environ if env is None else env
    auth = (auth or "auto").strip().lower().replace("-", "_")
    if auth not in AUTH_CHOICES:
        raise PreflightError(f"auth must be one of {', '.join(AUTH_CHOICES)}, got {auth!r}")
    subscription = target.subscription_id if target else None
    if auth == "managed_identity":
        # Only on request: probing the metadata address (169.254.169.254) off Azure hangs or leaks traffic.
        if env.get("IDENTITY_ENDPOINT") or env.get("MSI_ENDPOINT"):
            where = f"identity endpoint {env.get('IDENTITY_ENDPOINT') or env.get('MSI_ENDPOINT')}"
        else:
            where = "the instance metadata service (Azure VM / compute instance)"
        who = (
            f"user-assigned identity {env['AZURE_CLIENT_ID']}"
            if env.get("AZURE_CLIENT_ID")
            else "system-assigned identity"
        )
        return CredentialSource("managed_identity", f"managed identity: {who} via {where}", "ManagedIdentityCredential")
    if auth == "service_principal":
        source, missing = _service_principal(env)
        if source is None:
            raise PreflightError(
                f"auth=service_principal but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                "export AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET (or AZURE_CLIENT_CERTIFICATE_PATH) "
                "of a service principal with access to the workspace"
            )
        return source
    if auth == "cli":
        source, why = _azure_cli(env, subscription)
        if source is None:
            raise PreflightError(f"auth=cli but {why}: install the Azure CLI and run `az login`")
        return source
    # auto: a complete service principal wins (that is what EnvironmentCredential would pick), then the CLI.
    source, missing = _service_principal(env)
    if source is not None:
        return source
    cli_source, why = _azure_cli(env, subscription)
    if cli_source is not None:
        return cli_source
    partial = [v for v in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET") if env.get(v, "").strip()]
    sp_hint = (
        f"service principal incomplete (missing {', '.join(missing)})"
        if partial
        else "no service principal (AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_TENANT_ID unset)"
    )
    raise PreflightError(
        f"no Azure credentials found: {sp_hint} and {why}. Run `az login`, or export AZURE_CLIENT_ID, "
        "AZURE_CLIENT_SECRET and AZURE_TENANT_ID, or on Azure compute pass --auth managed_identity "
        "(-P auth=managed_identity)"
    )


def _proxy_for(host: str, env) -> tuple[str, int] | None:
    proxy = env.get("HTTPS_PROXY") or env.get("https_proxy")
    if not proxy:
        return None
    no_proxy = (env.get("NO_PROXY") or env.get("no_proxy") or "").split(",")
    if any(entry.strip() and host.endswith(entry.strip().lstrip("*")) for entry in no_proxy):
        return None
    parsed = urllib.parse.urlparse(proxy if "://" in proxy else "http://" + proxy)
    return parsed.hostname or "", parsed.port or 8080


def _connect(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens, else the reason."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve {host} ({exc.strerror or exc})"
    last = "no address"
    for family, socktype, proto, _, address in infos:
        try:
            with socket.socket(family, socktype, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                return None
        except OSError as exc:
            last = f"cannot connect to {host}:{port} ({exc.strerror or exc})"
    return last


def check_reachable(target: AzureTarget, timeout: float = 5.0, env=None) -> None:
    """Fail fast, with one line, when the workspace, ARM or login hosts cannot be reached (TCP only)."""
    env = os.environ if env is None else env
    hosts = [target.host, target.arm_host, target.login_host]
    checks = {}
    for host in hosts:
        proxy = _proxy_for(host, env)
        checks[host] = proxy if proxy else (host, 443)
    start = time.monotonic()
    # Threads so that a stuck DNS lookup (getaddrinfo has no timeout) cannot hold the step past `timeout`.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(checks))
    futures = {host: pool.submit(_connect, h, p, timeout) for host, (h, p) in checks.items()}
    problems = []
    for host, future in futures.items():
        left = max(0.1, timeout + 1.0 - (time.monotonic() - start))
        try:
            reason = future.result(timeout=left)
        except concurrent.futures.TimeoutError:
            reason = f"no answer from {checks[host][0]} within {timeout:.0f} s"
        if reason:
            via = f" via proxy {checks[host][0]}:{checks[host][1]}" if checks[host][0] != host else ""
            problems.append(f"{host}{via}: {reason}")
    pool.shutdown(wait=False, cancel_futures=True)
    if problems:
        raise PreflightError(
            "cannot reach Azure (" + "; ".join(problems) + "): check the network connection, DNS and "
            "HTTPS_PROXY; nothing was sent to Azure"
        )
