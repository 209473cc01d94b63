"""Azure ML side of the deploy step, without ever reaching Azure.

Everything that could touch the azureml plugin's network code runs in a subprocess inside its own network
namespace (`unshare -n`: no routes, loopback down), so a regression fails here instead of sending traffic;
the in-process tests only call pure functions (and pytest-socket guards the rest of the suite).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sqlite3
import sys
import textwrap

import pytest

from carclf.deployment import azure_preflight as pf
from carclf.deployment.azure_config import (
    COMPUTE_CHOICES,
    build_deploy_config,
    build_endpoint_config,
    render_config,
    write_config,
)
from carclf.deployment.errors import DeployError
from conftest import REPO_ROOT
from entry_points.deploy import deploy
from helpers_deploy import FakeAzureML, clean_azure_env, offline_run

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
    assert not list(tmp_path.glob(f".{compute}.json.partial-*"))


def test_checked_in_endpoint_example_equals_the_generated_default(tmp_path):
    generated = write_config(build_endpoint_config(), tmp_path, "endpoint")
    assert generated.read_text() == (REPO_ROOT / "deploy" / "endpoint.json").read_text()


def test_defaults_follow_the_article_container():
    aci = build_deploy_config("aci")
    assert aci["computeType"] == "aci" and aci["containerResourceRequirements"] == {"cpu": 3, "memoryInGB": 12}
    aks = build_deploy_config("aks", min_replicas=2, max_replicas=5)
    assert aks["autoScaler"]["minReplicas"] == 2 and aks["autoScaler"]["maxReplicas"] == 5
    managed = build_deploy_config("managed", instance_type="Standard_F4s_v2", instance_count=3)
    assert "computeType" not in managed  # how the plugin tells a managed online deployment apart
    assert managed["instance_type"] == "Standard_F4s_v2" and managed["instance_count"] == 3
    # Azure installs the model's requirements (TensorFlow...) at container start: minutes before it can answer.
    assert managed["liveness_probe"]["initial_delay"] >= 600 and managed["readiness_probe"]["initial_delay"] >= 300
    assert managed["environment_variables"] == {"CARCLF_ERRORS": "coerce"}
    assert "scale_settings" not in managed and "endpoint_name" not in managed
    assert build_deploy_config()["instance_type"] == "Standard_DS3_v2"  # managed is the default
    for bad in (
        dict(compute="gpu"),
        dict(cpu_cores=0),
        dict(compute="aks", min_replicas=3, max_replicas=2),
        dict(compute="managed", request_timeout_s=600),
        dict(compute="managed", instance_count=0),
        dict(compute="managed", instance_type="Standard_DS1_v2"),
    ):
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
    from azureml.mlflow.deploy._mir.mir import OnlineEndpointConfiguration
    from azureml.mlflow._restclient.mfe_v2022_02_01_preview.models import (
        ManagedOnlineDeployment, OnlineDeploymentData, Sku)

    target, files = sys.argv[1], sys.argv[2:]
    client = get_deploy_client(target)  # offline: the credential is only used at the first REST call
    results = {}
    for path in files:
        try:
            with open(path) as stream:
                obj = file_stream_to_object(stream)
            if os.path.basename(path).startswith(("endpoint", "traffic")):
                # create_endpoint / update_endpoint: the plugin's own conversion, then the REST serializer.
                kind = "endpoint"
                config = OnlineEndpointConfiguration._from_dict_config(obj)
                config.location = "westeurope"
                operations = client._mir_client._client.online_endpoints
                if os.path.basename(path).startswith("traffic"):
                    body = operations._serialize.body(config._to_rest_update_config(),
                                                      "PartialOnlineEndpointPartialTrackedResource")
                else:
                    body = operations._serialize.body(config._to_rest(), "OnlineEndpointData")
            elif COMPUTE_TYPE_KEY in obj:
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
    parsed = json.loads(line[len("RESULT ") :])
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
    # The plugin's scale_settings bug: neither spelling gets through, which is why the generated file has none.
    files["bad_managed_scale_type"] = {**build_deploy_config("managed"), "scale_settings": {"type": "Default"}}
    files["bad_managed_scale_scale_type"] = {
        **build_deploy_config("managed"),
        "scale_settings": {"scale_type": "Default"},
    }
    files["endpoint"] = build_endpoint_config()
    files["endpoint_token"] = build_endpoint_config("aml_token")
    files["traffic"] = build_endpoint_config(traffic={"blue": 90, "green": 10})
    results = _plugin_parse(tmp_path, files)

    assert all(results[c]["ok"] for c in (*COMPUTE_CHOICES, "aci_small", "endpoint", "endpoint_token", "traffic")), (
        results
    )
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
    assert props["livenessProbe"]["initialDelay"] == "PT10M" and props["readinessProbe"]["initialDelay"] == "PT5M"
    assert props["environmentVariables"] == {"CARCLF_ERRORS": "coerce"}
    endpoint = results["endpoint"]["body"]
    assert endpoint["properties"]["authMode"] == "Key" and endpoint["identity"]["type"] == "SystemAssigned"
    assert endpoint["properties"]["properties"] == {"azureml.mlflow_client_endpoint": "True"}
    assert results["endpoint_token"]["body"]["properties"]["authMode"] == "AMLToken"
    assert results["traffic"]["body"]["properties"] == {"traffic": {"blue": 90, "green": 10}}
    # `type` is dropped on the way: the body carries scaleSettings without its scaleType discriminator (refused
    # by Azure); `scale_type` makes the plugin's converter fail.
    assert results["bad_managed_scale_type"]["body"]["properties"]["scaleSettings"] == {}
    assert "scaleSettings" not in props
    assert (
        not results["bad_managed_scale_scale_type"]["ok"]
        and "KeyError" in results["bad_managed_scale_scale_type"]["error"]
    )

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
        "westeurope",
        SUB,
        "rg-cars",
        "ws-cars",
    )
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
    command = [
        sys.executable,
        "-m",
        "entry_points.deploy",
        "--model-uri",
        "models:/carclf/1",
        "--target",
        TARGET,
        "--name",
        "car-resnet",
        "--config-dir",
        str(tmp_path / "cfg"),
        *args,
    ]
    # A preflight that hung on the network (minutes) ends the test as a subprocess timeout.
    return offline_run(command, env=env, timeout=timeout, cwd=tmp_path)


def _nothing_created(tmp_path, store_uri):
    assert not (tmp_path / "cfg").exists(), "the config folder must not be created before the preflight passed"
    assert not (tmp_path / "mlruns").exists()
    store_file = pathlib.Path(store_uri.replace("sqlite:///", ""))
    with contextlib.closing(sqlite3.connect(store_file)) as store:  # the test's empty store (conftest)
        runs = store.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        experiments = [name for (name,) in store.execute("SELECT name FROM experiments")]
    assert runs == 0 and experiments == ["Default"], "no MLflow run may be created before the preflight passed"


def test_cli_without_credentials_fails_fast_with_one_line(tmp_path, mlflow_store):
    result = _deploy_cli(tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "no Azure credentials found" in errors[0] and "az login" in errors[0] and "AZURE_CLIENT_ID" in errors[0]
    assert "managed_identity" in errors[0]
    _nothing_created(tmp_path, mlflow_store)


def test_cli_with_malformed_target_fails_fast(tmp_path, mlflow_store):
    env = clean_azure_env(tmp_path)
    env.update(SP)
    bad = TARGET.replace("resourceGroups", "resourcegroup")
    result = offline_run(
        [
            sys.executable,
            "-m",
            "entry_points.deploy",
            "--model-uri",
            "models:/carclf/1",
            "--target",
            bad,
            "--name",
            "car-resnet",
            "--config-dir",
            str(tmp_path / "cfg"),
        ],
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: target") and "expected 'resourceGroups'" in result.stderr
    _nothing_created(tmp_path, mlflow_store)


def test_cli_without_network_fails_fast_naming_the_hosts(tmp_path, mlflow_store):
    result = _deploy_cli(tmp_path, extra_env=SP)
    assert result.returncode == 2, result.stderr
    error = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")][0]
    assert "cannot reach Azure" in error and "westeurope.api.azureml.ms" in error and "management.azure.com" in error
    assert "nothing was sent to Azure" in error
    _nothing_created(tmp_path, mlflow_store)


@pytest.mark.slow
def test_plugin_call_without_network_ends_with_a_clear_line(tmp_path, mlflow_store):
    """Past the preflight (network check off), the real plugin runs and must fail cleanly, not hang."""
    result = _deploy_cli(tmp_path, extra_env=SP, args=("--network-check", "false"), timeout=150)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "car-resnet" in errors[0] and "login.microsoftonline.com" in errors[0]
    # The config file was written after the preflight, and equals the checked-in example.
    assert (tmp_path / "cfg" / "managed.json").read_text() == (REPO_ROOT / "deploy" / "managed.json").read_text()
    # The run tracked what was attempted (and failed with the step).
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    params = runs[0].data.params
    assert (params["target"], params["name"], params["model_uri"], params["compute"]) == (
        TARGET,
        "car-resnet",
        "models:/carclf/1",
        "managed",
    )
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "deploy")]
    assert artifacts == ["deploy/managed.json"]


def test_function_refuses_bad_azure_parameters_before_anything_else(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DeployError, match="3-32 lower-case"):
        deploy(model_uri="models:/carclf/1", target=TARGET, name="Car_ResNet", config_dir=tmp_path / "cfg")
    with pytest.raises(DeployError, match="models:/<name>/<version>"):
        deploy(model_uri="/tmp/some/model", target=TARGET, name="car-resnet", config_dir=tmp_path / "cfg")
    with pytest.raises(DeployError, match="unsupported target"):
        deploy(model_uri="models:/carclf/1", target="sagemaker", name="car-resnet")
    with pytest.raises(pf.PreflightError, match="no Azure credentials"):
        deploy(model_uri="models:/carclf/1", target=TARGET, name="car-resnet", config_dir=tmp_path / "cfg")
    assert not (tmp_path / "cfg").exists()


def test_plugin_is_narrowed_to_the_credential_the_preflight_chose(monkeypatch):
    from carclf.deployment.plugin_calls import narrowed_credential_env

    monkeypatch.delenv("AZURE_TOKEN_CREDENTIALS", raising=False)
    assert narrowed_credential_env("AzureCliCredential") == {"AZURE_TOKEN_CREDENTIALS": "AzureCliCredential"}
    assert narrowed_credential_env("NoSuchCredential") == {}  # refused by azure-identity: chain left alone
    assert "AZURE_TOKEN_CREDENTIALS" not in os.environ
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")  # the user's own choice wins
    assert narrowed_credential_env("EnvironmentCredential") == {}


# ------------------------------------------------------------------------------------------ blue/green, offline
BLUE_GREEN_SCRIPT = textwrap.dedent(
    """
    # The deploy CLI against a fake Azure ML answering the plugin's real requests (helpers_deploy.FakeAzureML).
    import json, sys
    from helpers_deploy import FakeAzureML

    spec = json.loads(sys.argv[1])
    fake = FakeAzureML(spec["sub"], "rg-cars", "ws-cars", endpoints=spec["endpoints"],
                       deployments={tuple(k.split("/")): v for k, v in spec["deployments"].items()})
    fake.install()
    from entry_points.deploy import main
    rc = main(spec["argv"])
    print("FAKE " + json.dumps({"rc": rc, "calls": fake.calls, "scores": fake.scores, "endpoints": fake.endpoints,
                                "deployments": {"/".join(k): v for k, v in fake.deployments.items()}}, default=str))
    """
)


def _blue_green(tmp_path, args, endpoints=None, deployments=None):
    """Run `entry_points.deploy` (network check off: the fake is not on the network) under unshare -n."""
    script = tmp_path / "blue_green.py"
    script.write_text(BLUE_GREEN_SCRIPT)
    env = clean_azure_env(tmp_path)
    env.update(SP)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    spec = {
        "sub": SUB,
        "endpoints": endpoints or {},
        "deployments": deployments or {},
        "argv": [
            "--target",
            TARGET,
            "--name",
            "car-resnet",
            "--network-check",
            "false",
            "--config-dir",
            str(tmp_path / "cfg"),
            *args,
        ],
    }
    result = offline_run([sys.executable, str(script), json.dumps(spec)], env=env, timeout=180, cwd=tmp_path)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("FAKE ")), None)
    assert line, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    state = json.loads(line[len("FAKE ") :])
    state["stderr"] = result.stderr
    state["result"] = json.loads(result.stdout[: result.stdout.index("FAKE ")]) if state["rc"] == 0 else None
    return state


def _arm(state, method, suffix):
    return [
        c
        for c in state["calls"]
        if c["method"] == method and c["host"] == "management.azure.com" and c["path"].endswith(suffix)
    ]


def test_new_endpoint_is_created_with_key_auth_then_gets_all_traffic_after_the_smoke_test(tmp_path):
    from helpers_deploy import register_version_model

    model = register_version_model(tmp_path, "carclf", "one", labelled=True)
    state = _blue_green(tmp_path, ["--model-uri", model])
    assert state["rc"] == 0, state["stderr"][-3000:]
    (create,) = _arm(state, "PUT", "/onlineEndpoints/car-resnet")
    assert create["body"]["properties"]["authMode"] == "Key"
    assert create["body"]["location"] == "westeurope"  # read from the workspace, as the plugin does
    (deployment,) = _arm(state, "PUT", "/onlineEndpoints/car-resnet/deployments/blue")
    props = deployment["body"]["properties"]
    assert props["model"].endswith("/models/carclf/versions/1") and props["instanceType"] == "Standard_DS3_v2"
    assert props["environmentVariables"] == {"CARCLF_ERRORS": "coerce"}
    assert props["livenessProbe"]["initialDelay"] == "PT10M" and props["readinessProbe"]["initialDelay"] == "PT5M"
    assert props["requestSettings"]["requestTimeout"] == "PT1M30S"
    # The smoke test went to blue alone, with the endpoint key, in Azure's input_data shape, BEFORE traffic moved.
    order = [(c["method"], c["path"].rsplit("/", 1)[-1]) for c in state["calls"]]
    score = next(i for i, c in enumerate(state["calls"]) if c["path"] == "/score")
    moved = next(i for i, c in enumerate(state["calls"]) if c["method"] == "PATCH")
    assert score < moved, order
    call = state["calls"][score]
    assert call["headers"]["azureml-model-deployment"] == "blue"
    assert call["headers"]["Authorization"] == "Bearer fake-primary-key"
    assert set(call["body"]["input_data"]) == {"columns", "index", "data"} and call["body"]["input_data"][
        "columns"
    ] == ["image"]
    assert state["scores"] == [{"deployment": "blue", "model": "carclf/1", "columns": ["image"]}]
    assert _arm(state, "PATCH", "/onlineEndpoints/car-resnet")[0]["body"]["properties"]["traffic"] == {"blue": 100}
    assert state["endpoints"]["car-resnet"]["properties"]["traffic"] == {"blue": 100}
    result = state["result"]
    assert result["action"] == "created endpoint" and result["deployment"] == "blue"
    assert result["smoke_test"]["label"] == "car-one" and result["traffic"] == {"blue": 100}
    # The files the plugin read are kept in config_dir: deployment, endpoint and traffic configs.
    assert json.loads((tmp_path / "cfg" / "endpoint.json").read_text())["auth_mode"] == "key"
    assert json.loads((tmp_path / "cfg" / "traffic.json").read_text()) == {"traffic": {"blue": 100}}


def test_a_model_azures_scorer_cannot_boot_is_refused_before_any_azure_call(tmp_path):
    from helpers_deploy import register_version_model

    model = register_version_model(tmp_path, "carclf", "old", labelled=True, nested_output=True)
    state = _blue_green(tmp_path, ["--model-uri", model])
    assert state["rc"] != 0
    last = state["stderr"].strip().splitlines()[-1]
    assert "output schema has columns that are not plain types (top_k)" in last and "re-log it" in last, last
    assert not [c for c in state["calls"] if c["method"] in ("PUT", "PATCH")]


def test_existing_endpoint_gets_a_green_deployment_at_zero_then_the_traffic(tmp_path):
    from helpers_deploy import register_version_model

    register_version_model(tmp_path, "carclf", "one", labelled=True)
    model = register_version_model(tmp_path, "carclf", "two", labelled=True)
    state = _blue_green(
        tmp_path,
        ["--model-uri", model, "--delete-old", "true"],
        endpoints={"car-resnet": {"blue": 100}},
        deployments={"car-resnet/blue": ["carclf", "1"]},
    )
    assert state["rc"] == 0, state["stderr"][-3000:]
    assert not _arm(state, "PUT", "/onlineEndpoints/car-resnet"), "an existing endpoint must not be re-created"
    (green,) = _arm(state, "PUT", "/deployments/green")
    assert green["body"]["properties"]["model"].endswith("/models/carclf/versions/2")
    # While green was smoke-tested, blue still had all the traffic: no PATCH came before the smoke test.
    score = next(i for i, c in enumerate(state["calls"]) if c["path"] == "/score")
    assert all(c["method"] != "PATCH" for c in state["calls"][:score])
    assert state["scores"] == [{"deployment": "green", "model": "carclf/2", "columns": ["image"]}]
    patches = [c["body"]["properties"]["traffic"] for c in _arm(state, "PATCH", "/onlineEndpoints/car-resnet")]
    assert patches[0] == {"blue": 0, "green": 100}
    assert _arm(state, "DELETE", "/deployments/blue"), "delete_old removes the old deployment"
    assert set(state["deployments"]) == {"car-resnet/green"}
    assert state["endpoints"]["car-resnet"]["properties"]["traffic"] == {"green": 100}
    assert state["result"]["deleted"] == ["blue"] and state["result"]["traffic_before"] == {"blue": 100}


def test_canary_share_and_alias_resolved_before_the_plugin_sees_it(tmp_path):
    import mlflow

    from helpers_deploy import register_version_model

    register_version_model(tmp_path, "carclf", "one", labelled=True)
    register_version_model(tmp_path, "carclf", "two", labelled=True)
    mlflow.MlflowClient().set_registered_model_alias("carclf", "champion", "2")
    state = _blue_green(
        tmp_path,
        ["--model-uri", "models:/carclf@champion", "--traffic", "10"],
        endpoints={"car-resnet": {"blue": 100}},
        deployments={"car-resnet/blue": ["carclf", "1"]},
    )
    assert state["rc"] == 0, state["stderr"][-3000:]
    (green,) = _arm(state, "PUT", "/deployments/green")
    assert green["body"]["properties"]["model"].endswith("/models/carclf/versions/2")
    assert state["endpoints"]["car-resnet"]["properties"]["traffic"] == {"blue": 90, "green": 10}
    assert state["result"]["model_uri"] == "models:/carclf/2" and state["result"]["action"] == "canary"
    assert not _arm(state, "DELETE", "/deployments/blue")
    # A missing alias: one line naming it, before anything reaches Azure.
    state = _blue_green(tmp_path, ["--model-uri", "models:/carclf@nope"])
    assert state["rc"] == 2 and not state["calls"]
    errors = [ln for ln in state["stderr"].splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "alias 'nope'" in errors[0] and "Traceback" not in state["stderr"]


@pytest.mark.parametrize("broken", [True, "answers"], ids=["fails-to-load", "fails-to-score"])
def test_failed_smoke_test_leaves_traffic_where_it_was(tmp_path, broken):
    from helpers_deploy import register_version_model

    register_version_model(tmp_path, "carclf", "one", labelled=True)
    model = register_version_model(tmp_path, "carclf", "two", broken=broken, labelled=True)
    state = _blue_green(
        tmp_path,
        ["--model-uri", model, "--delete-old", "true"],
        endpoints={"car-resnet": {"blue": 100}},
        deployments={"car-resnet/blue": ["carclf", "1"]},
    )
    assert state["rc"] == 2
    errors = [ln for ln in state["stderr"].splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in state["stderr"], state["stderr"][-3000:]
    assert "smoke test of deployment 'green'" in errors[0] and FakeAzureML.SCORING_ERROR in errors[0]
    assert "az ml online-deployment get-logs -e car-resnet -n green" in errors[0]
    assert "traffic unchanged (blue=100%)" in errors[0]
    assert _arm(state, "PUT", "/deployments/green") and not _arm(state, "PATCH", "/onlineEndpoints/car-resnet")
    assert not _arm(state, "DELETE", "/deployments/blue")
    assert state["endpoints"]["car-resnet"]["properties"]["traffic"] == {"blue": 100}


def test_smoke_test_fails_on_an_error_row(tmp_path):
    from helpers_deploy import register_version_model

    model = register_version_model(tmp_path, "carclf", "one", broken="coerce", labelled=True)
    state = _blue_green(tmp_path, ["--model-uri", model])
    assert state["rc"] == 2
    (error,) = [ln for ln in state["stderr"].splitlines() if ln.startswith("error:")]
    assert "smoke test of deployment 'blue'" in error and "the model answered error: row 0: not a recognised" in error
    assert "traffic unchanged (no traffic)" in error
    assert state["endpoints"]["car-resnet"]["properties"]["traffic"] == {}


def test_an_idle_deployment_left_by_a_failed_rollout_is_updated_not_duplicated(tmp_path):
    from helpers_deploy import register_version_model

    register_version_model(tmp_path, "carclf", "one", labelled=True)
    model = register_version_model(tmp_path, "carclf", "two", labelled=True)
    state = _blue_green(
        tmp_path,
        ["--model-uri", model],
        endpoints={"car-resnet": {"blue": 100, "green": 0}},
        deployments={"car-resnet/blue": ["carclf", "1"], "car-resnet/green": ["carclf", "1"]},
    )
    assert state["rc"] == 0, state["stderr"][-3000:]
    updates = [
        c for c in state["calls"] if c["method"] in ("PUT", "PATCH") and c["path"].endswith("/deployments/green")
    ]
    assert len(updates) == 1 and updates[0]["body"]["properties"]["model"].endswith("/models/carclf/versions/2")
    assert state["scores"][0]["model"] == "carclf/2"
    assert state["endpoints"]["car-resnet"]["properties"]["traffic"] == {"blue": 0, "green": 100}
    assert set(state["deployments"]) == {"car-resnet/blue", "car-resnet/green"}  # no delete_old: blue stays


def test_a_canary_in_progress_is_not_overwritten(tmp_path):
    from helpers_deploy import register_version_model

    model = register_version_model(tmp_path, "carclf", "one", labelled=True)
    state = _blue_green(
        tmp_path,
        ["--model-uri", model],
        endpoints={"car-resnet": {"blue": 90, "green": 10}},
        deployments={"car-resnet/blue": ["carclf", "1"], "car-resnet/green": ["carclf", "1"]},
    )
    assert state["rc"] == 2 and not _arm(state, "PUT", "/deployments/blue")
    assert "both blue and green carry traffic" in state["stderr"]


def test_legacy_compute_warns_in_one_line_naming_the_retirement(tmp_path, mlflow_store):
    result = _deploy_cli(tmp_path, args=("--compute", "aci"))
    warnings = [ln for ln in result.stderr.splitlines() if "deprecated" in ln]
    assert len(warnings) == 1 and "2026-06-30" in warnings[0] and "compute=managed" in warnings[0], result.stderr
    (tmp_path / "d").mkdir()
    default = _deploy_cli(tmp_path / "d")
    assert "deprecated" not in default.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--traffic", "0"), "traffic must be a whole percentage from 1 to 100"),
        (("--traffic", "50", "--delete-old", "true"), "delete_old needs traffic=100"),
        (("--smoke-image", "/nonexistent.jpg"), "smoke_image '/nonexistent.jpg': cannot read"),
        (("--endpoint-auth", "password"), "endpoint_auth must be key, aml_token or aad_token"),
        (("--instance-type", "Standard_DS2_v2"), "instance_type 'Standard_DS2_v2' is too small"),
    ],
)
def test_bad_rollout_parameters_are_named_before_anything_else(tmp_path, mlflow_store, args, expected):
    result = _deploy_cli(tmp_path, args=args)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    _nothing_created(tmp_path, mlflow_store)


def test_resolve_model_uri_gives_the_plugin_a_version_number(tmp_path):
    import mlflow

    from carclf.deployment.model_uri import resolve_model_uri
    from helpers_deploy import register_version_model

    register_version_model(tmp_path, "carclf", "one")
    register_version_model(tmp_path, "carclf", "two")
    mlflow.MlflowClient().set_registered_model_alias("carclf", "champion", "1")
    assert resolve_model_uri("models:/carclf@champion") == "models:/carclf/1"
    assert resolve_model_uri("models:/carclf/latest") == "models:/carclf/2"
    assert resolve_model_uri("models:/carclf/2") == "models:/carclf/2"
    with pytest.raises(DeployError, match=r"cannot resolve alias 'gone' of registered model 'carclf'"):
        resolve_model_uri("models:/carclf@gone")
    with pytest.raises(DeployError, match="registered model 'nobody'"):
        resolve_model_uri("models:/nobody/latest")
