"""Azure ML side of the deploy step, without ever reaching Azure.

Everything that could touch the azureml plugin's network code runs in a subprocess inside its own network
namespace (`unshare -n`: no routes, loopback down), so a regression fails here instead of sending traffic;
the in-process tests only call pure functions (and pytest-socket guards the rest of the suite).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import textwrap
import time

import pytest

from conftest import REPO_ROOT
from helpers_deploy import clean_azure_env, offline_run

from entry_points import azure_preflight as pf
from entry_points.deploy import COMPUTE_CHOICES, DeployError, build_deploy_config, deploy, render_config, write_config

SUB = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
TARGET = (
    f"azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/{SUB}/resourceGroups/rg-cars"
    "/providers/Microsoft.MachineLearningServices/workspaces/ws-cars"
)


# ------------------------------------------------------------------------------------------ config files
@pytest.mark.parametrize("compute", COMPUTE_CHOICES)
def test_checked_in_examples_equal_generated_defaults(compute, tmp_path):
    example = REPO_ROOT / "deploy" / f"{compute}.json"
    generated = write_config(build_deploy_config(compute), tmp_path, compute)
    assert generated.read_text() == example.read_text(), f"deploy/{compute}.json is stale: regenerate it"
    assert not list(tmp_path.glob(".*.tmp"))


def test_defaults_follow_the_article_container():
    aci = build_deploy_config("aci")
    assert aci["computeType"] == "aci" and aci["containerResourceRequirements"] == {"cpu": 3, "memoryInGB": 12}
    aks = build_deploy_config("aks", min_replicas=2, max_replicas=5)
    assert aks["autoScaler"]["minReplicas"] == 2 and aks["autoScaler"]["maxReplicas"] == 5
    managed = build_deploy_config("managed", instance_type="Standard_F4s_v2", instance_count=3)
    assert "computeType" not in managed  # how the plugin tells a managed online deployment apart
    assert managed["instance_type"] == "Standard_F4s_v2" and managed["instance_count"] == 3
    assert managed["liveness_probe"]["initial_delay"] >= 60  # the model takes a while to load
    for bad in (dict(compute="gpu"), dict(cpu_cores=0), dict(compute="aks", min_replicas=3, max_replicas=2),
                dict(compute="managed", request_timeout_s=600), dict(compute="managed", instance_count=0)):
        with pytest.raises(DeployError):
            build_deploy_config(**bad)


PLUGIN_PARSE_SCRIPT = textwrap.dedent(
    """
    # Feeds config files through azureml-mlflow's OWN code, in the order create_deployment uses it, and
    # through the REST clients' serializers that validate a request body before it would be sent.
    import json, os, sys
    os.environ["AZUREML_CURRENT_CLOUD"] = "AzureCloud"
    from mlflow.deployments import get_deploy_client
    from azureml.mlflow.deploy._util import file_stream_to_object
    from azureml.mlflow.deploy._mms._constants import COMPUTE_TYPE_KEY
    from azureml.mlflow.deploy._mms.webservice.aci.aci import AciServiceDeploymentConfiguration
    from azureml.mlflow.deploy._mms.webservice.aks.aks import AksServiceDeploymentConfiguration
    from azureml.mlflow.deploy._mir._util import convert_v2_deploy_config_to_rest_config
    from azureml.mlflow._restclient.mfe_v2022_02_01_preview.models import (
        ManagedOnlineDeployment, OnlineDeploymentData, Sku)

    target, files = sys.argv[1], sys.argv[2:]
    client = get_deploy_client(target)  # offline: the credential is only used at the first REST call
    results = {}
    for path in files:
        try:
            with open(path) as stream:
                obj = file_stream_to_object(stream)
            if COMPUTE_TYPE_KEY in obj:
                kind = obj[COMPUTE_TYPE_KEY].lower()
                parser = {"aci": AciServiceDeploymentConfiguration, "aks": AksServiceDeploymentConfiguration}[kind]
                config = parser._create_deploy_config_from_dict(deploy_config_dict=obj)
                request = config._to_service_create_request(name="car-resnet", environment_image_request=None)
                body = client._mms_client._client.services._serialize.body(request, "CreateServiceRequest")
            else:
                kind = "managed"
                for refused in ("model", "code_configuration", "environment", "endpoint_name"):
                    assert refused not in obj, refused
                obj["model"] = "/subscriptions/s/resourceGroups/r/providers/Microsoft.MachineLearningServices/workspaces/w/models/carclf/versions/1"
                rest = convert_v2_deploy_config_to_rest_config(obj)
                data = OnlineDeploymentData(location="westeurope", properties=ManagedOnlineDeployment(**rest),
                                            sku=Sku(name="Default", capacity=obj.get("instance_count", 1)))
                body = client._mir_client._client.online_deployments._serialize.body(data, "OnlineDeploymentData")
            results[path] = {"ok": True, "kind": kind, "body": body}
        except Exception as exc:
            results[path] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(results, default=str))
    """
)


def _plugin_parse(tmp_path, files: dict[str, dict]) -> dict:
    paths = []
    for name, config in files.items():
        path = tmp_path / f"{name}.json"
        path.write_text(render_config(config))
        paths.append(str(path))
    script = tmp_path / "plugin_parse.py"
    script.write_text(PLUGIN_PARSE_SCRIPT)
    result = offline_run([sys.executable, str(script), TARGET, *paths], env=clean_azure_env(tmp_path), timeout=120)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert result.returncode == 0 and line, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"
    parsed = json.loads(line[len("RESULT "):])
    return {pathlib.Path(p).stem: v for p, v in parsed.items()}


def test_generated_configs_accepted_by_the_azureml_plugins_own_parsers(tmp_path):
    files = {c: build_deploy_config(c) for c in COMPUTE_CHOICES}
    files["aci_small"] = build_deploy_config("aci", cpu_cores=1.5, memory_gb=6)
    # Negative controls: the same code must refuse what Azure would refuse, or this test proves nothing.
    files["bad_aci_cpu"] = {**build_deploy_config("aci"), "containerResourceRequirements": {"cpu": 0, "memoryInGB": 12}}
    bad_managed = build_deploy_config("managed")
    bad_managed["request_settings"] = {**bad_managed["request_settings"], "request_timeout_ms": 90000}
    files["bad_managed_timeout"] = bad_managed
    files["bad_aks_replicas"] = {**build_deploy_config("aks"), "numReplicas": 2}  # autoscale + fixed replicas
    results = _plugin_parse(tmp_path, files)

    assert all(results[c]["ok"] for c in (*COMPUTE_CHOICES, "aci_small")), results
    aci = results["aci"]["body"]
    assert aci["computeType"] == "ACI" and aci["containerResourceRequirements"] == {"cpu": 3.0, "memoryInGB": 12.0}
    assert aci["authEnabled"] is True
    assert results["aci_small"]["body"]["containerResourceRequirements"] == {"cpu": 1.5, "memoryInGB": 6.0}
    aks = results["aks"]["body"]
    assert aks["computeType"] == "AKS" and aks["computeName"] == "aks-cluster"
    assert aks["autoScaler"]["autoscaleEnabled"] is True and aks["scoringTimeoutMs"] == 90000
    assert aks["livenessProbeRequirements"]["initialDelaySeconds"] == 120
    managed = results["managed"]["body"]
    assert managed["sku"]["capacity"] == 1
    props = managed["properties"]
    assert props["instanceType"] == "Standard_DS3_v2" and props["endpointComputeType"] == "Managed"
    assert props["requestSettings"]["requestTimeout"] == "PT1M30S"
    assert props["livenessProbe"]["initialDelay"] == "PT2M" and props["readinessProbe"]["initialDelay"] == "PT1M"

    assert not results["bad_aci_cpu"]["ok"] and "cpu_cores must be positive" in results["bad_aci_cpu"]["error"]
    assert not results["bad_managed_timeout"]["ok"] and "duration" in results["bad_managed_timeout"]["error"]
    assert not results["bad_aks_replicas"]["ok"] and "num_replicas" in results["bad_aks_replicas"]["error"]


# ------------------------------------------------------------------------------------------ target URI
@pytest.mark.parametrize(
    "uri, problem",
    [
        ("", "target is empty"),
        ("https://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/x", "not an azureml:// workspace URI"),
        ("azureml://example.com/mlflow/v1.0/subscriptions/x", "not an Azure ML workspace API host"),
        (TARGET.replace("/v1.0", "/v2.0"), "expected 'v1.0'"),
        (TARGET.split("/providers")[0], "missing /providers/Microsoft.MachineLearningServices/workspaces/<workspace>"),
        (TARGET.replace(SUB, "my-subscription"), "subscription id 'my-subscription' is not a GUID"),
        (TARGET + "/extra", "extra path segments"),
        (TARGET.replace("ws-cars", "ws cars"), "workspace name 'ws cars' is not valid"),
    ],
)
def test_malformed_target_uri_is_named(uri, problem):
    with pytest.raises(pf.PreflightError) as error:
        pf.parse_target(uri)
    message = str(error.value)
    assert problem in message and "\n" not in message
    if uri:
        assert "mlflow_tracking_uri" in message  # says how to get a good one


def test_target_uri_parts():
    target = pf.parse_target(TARGET)
    assert (target.region, target.subscription_id, target.resource_group, target.workspace) == (
        "westeurope", SUB, "rg-cars", "ws-cars")
    assert target.cloud == "AzureCloud" and target.arm_host == "management.azure.com"
    gov = pf.parse_target(TARGET.replace("westeurope.api.azureml.ms", "usgovvirginia.api.ml.azure.us"))
    assert gov.cloud == "AzureUSGovernment"


# ------------------------------------------------------------------------------------------ credentials
def _fake_az(tmp_path, logged_in=True, token_cache=True, subscription=SUB) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    az = bin_dir / "az"
    az.write_text("#!/bin/sh\necho 'the preflight must not run az' >&2\nexit 99\n")
    az.chmod(0o755)
    config = tmp_path / "azcfg"
    config.mkdir(parents=True, exist_ok=True)
    if logged_in:
        profile = {"subscriptions": [{"id": subscription, "user": {"name": "dev@example.com", "type": "user"}}]}
        # The CLI writes a UTF-8 byte order mark.
        (config / "azureProfile.json").write_text(json.dumps(profile), encoding="utf-8-sig")
    if token_cache:
        (config / "msal_token_cache.json").write_text('{"AccessToken": {}}')
    return {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "AZURE_CONFIG_DIR": str(config)}


SP = {"AZURE_CLIENT_ID": "11111111-2222-3333-4444-555555555555", "AZURE_TENANT_ID": "t", "AZURE_CLIENT_SECRET": "s"}


def test_credential_source_decisions(tmp_path):
    target = pf.parse_target(TARGET)
    no_az = {"PATH": "/nonexistent"}
    assert pf.find_credential("auto", target, {**no_az, **SP}).kind == "service_principal"
    assert pf.find_credential("auto", target, {**SP, **_fake_az(tmp_path)}).kind == "service_principal"
    cli = pf.find_credential("auto", target, _fake_az(tmp_path))
    assert cli.kind == "cli" and cli.token_credentials == "AzureCliCredential" and "dev@example.com" in cli.detail
    other_sub = pf.find_credential("cli", target, _fake_az(tmp_path / "o", subscription="other"))
    assert "not in the CLI profile" in other_sub.detail
    managed = pf.find_credential("managed_identity", target, no_az)
    assert managed.kind == "managed_identity" and managed.token_credentials == "ManagedIdentityCredential"
    # Managed identity only when asked for: auto never falls back to it.
    with pytest.raises(pf.PreflightError, match="no Azure credentials found"):
        pf.find_credential("auto", target, no_az)


@pytest.mark.parametrize(
    "auth, env_kind, expected",
    [
        ("auto", "nothing", "Run `az login`, or export AZURE_CLIENT_ID, AZURE_CLIENT_SECRET and AZURE_TENANT_ID"),
        ("auto", "partial_sp", "service principal incomplete (missing AZURE_TENANT_ID, AZURE_CLIENT_SECRET)"),
        ("service_principal", "partial_sp", "AZURE_TENANT_ID, AZURE_CLIENT_SECRET are not set"),
        ("cli", "nothing", "the Azure CLI (`az`) is not on PATH"),
        ("cli", "az_logged_out", "not logged in"),
        ("cli", "az_no_cache", "no token cache"),
        ("kerberos", "nothing", "auth must be one of"),
    ],
)
def test_missing_credentials_say_what_is_missing(auth, env_kind, expected, tmp_path):
    env = {
        "nothing": lambda: {"PATH": "/nonexistent"},
        "partial_sp": lambda: {"PATH": "/nonexistent", "AZURE_CLIENT_ID": "x"},
        "az_logged_out": lambda: _fake_az(tmp_path, logged_in=False),
        "az_no_cache": lambda: _fake_az(tmp_path, token_cache=False),
    }[env_kind]()
    with pytest.raises(pf.PreflightError) as error:
        pf.find_credential(auth, pf.parse_target(TARGET), env)
    assert expected in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ the CLI, offline
def _deploy_cli(tmp_path, extra_env=None, args=(), timeout=60):
    env = clean_azure_env(tmp_path)
    env.update(extra_env or {})
    command = [sys.executable, "-m", "entry_points.deploy", "--model-uri", "models:/carclf/1", "--target", TARGET,
               "--name", "car-resnet", "--config-dir", str(tmp_path / "cfg"), *args]
    start = time.monotonic()
    result = offline_run(command, env=env, timeout=timeout, cwd=tmp_path)
    return result, time.monotonic() - start


def _nothing_created(tmp_path, store_uri):
    assert not (tmp_path / "cfg").exists(), "the config folder must not be created before the preflight passed"
    assert not (tmp_path / "mlruns").exists()
    store_file = pathlib.Path(store_uri.replace("sqlite:///", ""))
    assert not store_file.exists(), "no MLflow run may be created before the preflight passed"


def test_cli_without_credentials_fails_fast_with_one_line(tmp_path, mlflow_store):
    result, seconds = _deploy_cli(tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "no Azure credentials found" in errors[0] and "az login" in errors[0] and "AZURE_CLIENT_ID" in errors[0]
    assert "managed_identity" in errors[0]
    assert seconds < 10, f"preflight took {seconds:.1f} s"
    _nothing_created(tmp_path, mlflow_store)


def test_cli_with_malformed_target_fails_fast(tmp_path, mlflow_store):
    env = clean_azure_env(tmp_path)
    env.update(SP)
    bad = TARGET.replace("resourceGroups", "resourcegroup")
    result = offline_run([sys.executable, "-m", "entry_points.deploy", "--model-uri", "models:/carclf/1", "--target",
                          bad, "--name", "car-resnet", "--config-dir", str(tmp_path / "cfg")],
                         env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: target") and "expected 'resourceGroups'" in result.stderr
    _nothing_created(tmp_path, mlflow_store)


def test_cli_without_network_fails_fast_naming_the_hosts(tmp_path, mlflow_store):
    result, seconds = _deploy_cli(tmp_path, extra_env=SP)
    assert result.returncode == 2, result.stderr
    error = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")][0]
    assert "cannot reach Azure" in error and "westeurope.api.azureml.ms" in error and "management.azure.com" in error
    assert "nothing was sent to Azure" in error
    assert seconds < 20, f"network check took {seconds:.1f} s"
    _nothing_created(tmp_path, mlflow_store)


@pytest.mark.slow
def test_plugin_call_without_network_ends_with_a_clear_line(tmp_path, mlflow_store):
    """Past the preflight (network check off), the real plugin runs and must fail cleanly, not hang."""
    result, seconds = _deploy_cli(tmp_path, extra_env=SP, args=("--network-check", "false"), timeout=150)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "car-resnet" in errors[0] and "login.microsoftonline.com" in errors[0]
    # The config file was written after the preflight, and equals the checked-in example.
    assert (tmp_path / "cfg" / "aci.json").read_text() == (REPO_ROOT / "deploy" / "aci.json").read_text()
    # The run tracked what was attempted (and failed with the step).
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    params = runs[0].data.params
    assert (params["target"], params["name"], params["model_uri"], params["compute"]) == (
        TARGET, "car-resnet", "models:/carclf/1", "aci")
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "deploy")]
    assert artifacts == ["deploy/aci.json"]


def test_function_refuses_bad_azure_parameters_before_anything_else(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DeployError, match="3-32 lower-case"):
        deploy("models:/carclf/1", TARGET, "Car_ResNet", config_dir=tmp_path / "cfg")
    with pytest.raises(DeployError, match="models:/<name>/<version>"):
        deploy("/tmp/some/model", TARGET, "car-resnet", config_dir=tmp_path / "cfg")
    with pytest.raises(DeployError, match="unsupported target"):
        deploy("models:/carclf/1", "sagemaker", "car-resnet")
    with pytest.raises(pf.PreflightError, match="no Azure credentials"):
        deploy("models:/carclf/1", TARGET, "car-resnet", config_dir=tmp_path / "cfg")
    assert not (tmp_path / "cfg").exists()


def test_plugin_is_narrowed_to_the_credential_the_preflight_chose(monkeypatch):
    from entry_points.deploy import _narrowed_credential_env

    monkeypatch.delenv("AZURE_TOKEN_CREDENTIALS", raising=False)
    assert _narrowed_credential_env("AzureCliCredential") == {"AZURE_TOKEN_CREDENTIALS": "AzureCliCredential"}
    assert _narrowed_credential_env("NoSuchCredential") == {}  # refused by azure-identity: chain left alone
    assert "AZURE_TOKEN_CREDENTIALS" not in os.environ
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")  # the user's own choice wins
    assert _narrowed_credential_env("EnvironmentCredential") == {}
