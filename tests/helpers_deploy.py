"""Shared pieces of the deploy tests: tiny registered pyfunc models, network-free subprocesses, server cleanup."""

from __future__ import annotations

import functools
import io
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

# Serving a real carclf model takes a TensorFlow import per server start; these tests are about the
# deployment machinery, so they serve a two-line model that reports its version and the bytes it got.
MODEL_CODE = textwrap.dedent(
    """
    import mlflow
    import pandas as pd

    VERSION = {version!r}
    BROKEN = {broken!r}
    LABELLED = {labelled!r}


    class VersionModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            if BROKEN is True:
                raise RuntimeError("carclf-test: this model version fails to load")

        def predict(self, context, model_input, params=None):
            if BROKEN == "answers":
                raise RuntimeError("carclf-test: this model version fails on every photo")
            answer = pd.DataFrame(
                {{"version": [VERSION] * len(model_input), "n_bytes": [len(v) for v in model_input["image"]]}}
            )
            if LABELLED:  # answers like a carclf model (a label per row)
                answer["label"] = f"car-{{VERSION}}"
            if BROKEN == "coerce":  # what carclf answers with errors=coerce when it cannot read the photo
                answer["label"] = None
                answer["error"] = "row 0: not a recognised image format"
            return answer


    mlflow.models.set_model(VersionModel())
    """
)


def register_version_model(
    tmp_path: pathlib.Path,
    name: str,
    version: str,
    broken: bool | str = False,
    labelled: bool = False,
    nested_output: bool = False,
) -> str:
    """Log + register a model (from code) that answers its version; returns models:/name/<registry version>.
    broken=True: fails to load; "answers": fails on every request; "coerce": answers every row with an `error`.
    labelled: adds a `label` column."""
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    code = tmp_path / f"model_{name}_{version}.py"
    code.write_text(MODEL_CODE.format(version=version, broken=broken, labelled=labelled))
    outputs = None
    if nested_output:  # the output schema carclf < 0.2 logged: top_k as a list of objects
        from mlflow.types.schema import Array, Object, Property

        outputs = Schema(
            [
                ColSpec("string", "label"),
                ColSpec(Array(Object([Property("label", "string"), Property("prob", "double")])), "top_k"),
            ]
        )
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=outputs)
    # The throwaway model has no input example and no type hints on purpose; MLflow warns about both.
    with mlflow.start_run(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            signature=signature,
            pip_requirements=["mlflow"],
            registered_model_name=name,
        )
    return f"models:/{name}/{info.registered_model_version}"


def tiny_jpeg(size: int = 32, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def unshare_problem() -> str | None:
    """None when `unshare -n` (a fresh network namespace: loopback down, no routes) works here."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        result = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc}"
    if result.returncode != 0:
        return f"unshare -n is not permitted here (needs root/CAP_SYS_ADMIN): {result.stderr.decode().strip()}"
    return None


def require_unshare(what: str = "the azureml plugin"):
    """Skip where `unshare -n` cannot run; FAIL in CI (env CI set), which runs as root: a skip there would
    hide that the offline Azure tests never ran."""
    problem = unshare_problem()
    if not problem:
        return
    message = f"cannot isolate {what} from the network: {problem}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: CI runs as root and must run the offline Azure tests)", pytrace=False)
    pytest.skip(message)


def offline_run(args, env=None, timeout=90, cwd=None) -> subprocess.CompletedProcess:
    """Run a command with NO network at all (its own network namespace), so a regression that reaches for
    Azure (or the 169.254.169.254 metadata address) fails instead of sending traffic."""
    require_unshare()
    return subprocess.run(["unshare", "-n", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def clean_azure_env(home: pathlib.Path) -> dict:
    """This environment without any Azure credential source: no SP variables, no `az`, an empty HOME."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AZURE_", "AZUREML_", "MSI_", "IDENTITY_")) and k not in ("HTTPS_PROXY", "https_proxy")
    }
    env["HOME"] = str(home)
    env["PATH"] = os.pathsep.join(
        p for p in (os.path.dirname(sys.executable), "/usr/bin", "/bin") if p and not (pathlib.Path(p) / "az").exists()
    )
    return env


def kill_servers_of_store(tracking_uri: str) -> list[int]:
    """Kill every process group whose environment names this test's tracking store (our servers only)."""
    import signal

    killed = []
    needle = f"MLFLOW_TRACKING_URI={tracking_uri}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = pathlib.Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            try:
                pgid = os.getpgid(int(entry.name))
            except ProcessLookupError:
                continue
            if pgid != os.getpgid(0):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                    killed.append(pgid)
                except ProcessLookupError:
                    pass
    return killed


# ------------------------------------------------------------------------------------------ a fake Azure ML
class FakeAzureML:
    """Azure ML's ARM API and an endpoint's scoring URI, answered in-process at `requests.Session.send`.

    Everything the azureml plugin sends (its REST clients go through azure-core's requests transport, its
    predict through `requests.post`) arrives here as the real `PreparedRequest` the plugin built: the test
    sees exactly the methods, URLs, bodies and headers that would go to Azure. Only the bearer token is
    faked (azure-core's BearerTokenCredentialPolicy), so no login is attempted. Run it under `unshare -n`:
    anything that slips past the fake finds no network. The scoring URI loads the deployment's registered
    model with MLflow's pyfunc loader and answers the way Azure's no-code script does (a list of records;
    any exception -> HTTP 500 with Azure's fixed text).
    """

    SCORING_ERROR = "An unexpected error occurred in scoring script. Check the logs for more info."

    def __init__(
        self,
        subscription: str,
        resource_group: str,
        workspace: str,
        location: str = "westeurope",
        endpoints: dict | None = None,
        deployments: dict | None = None,
    ):
        self.prefix = (
            f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/"
            f"Microsoft.MachineLearningServices/workspaces/{workspace}"
        )
        self.location = location
        # name -> endpoint resource; (endpoint, deployment) -> deployment resource
        self.endpoints: dict = {}
        self.deployments: dict = {}
        self.calls: list[dict] = []
        self.scores: list[dict] = []
        # Batch endpoints (carclf.deployment.azure_batch): compute clusters, assets, blobs, endpoints, jobs.
        self.computes: set = set()
        self.assets: dict = {}  # "codes/<name>/<version>" or "environments/..." -> resource
        self.blobs: dict = {}  # "<account>/<container>/<path>" -> bytes
        self.batch_endpoints: dict = {}
        self.batch_deployments: dict = {}
        self.jobs: list[dict] = []
        self.key = "fake-primary-key"
        for name, traffic in (endpoints or {}).items():
            self.endpoints[name] = self._endpoint_resource(
                name, {"properties": {"authMode": "Key", "traffic": traffic}}
            )
        for (endpoint, name), model in (deployments or {}).items():
            self.deployments[(endpoint, name)] = self._deployment_resource(
                endpoint,
                name,
                {
                    "properties": {
                        "model": f"{self.prefix}/models/{model[0]}/versions/{model[1]}",
                        "instanceType": "Standard_DS3_v2",
                    }
                },
            )

    # -- resources
    def _endpoint_resource(self, name, body):
        props = dict(body.get("properties") or {})
        props.update(
            provisioningState="Succeeded",
            scoringUri=f"https://{name}.{self.location}.inference.ml.azure.com/score",
            swaggerUri=f"https://{name}.{self.location}.inference.ml.azure.com/swagger.json",
        )
        props.setdefault("traffic", {})
        return {
            "id": f"{self.prefix}/onlineEndpoints/{name}",
            "name": name,
            "type": "onlineEndpoints",
            "location": body.get("location") or self.location,
            "tags": body.get("tags") or {},
            "identity": body.get("identity"),
            "properties": props,
        }

    def _deployment_resource(self, endpoint, name, body):
        props = dict(body.get("properties") or {})
        props.update(provisioningState="Succeeded", endpointComputeType="Managed")
        return {
            "id": f"{self.prefix}/onlineEndpoints/{endpoint}/deployments/{name}",
            "name": name,
            "type": "deployments",
            "location": body.get("location") or self.location,
            "sku": body.get("sku") or {"name": "Default", "capacity": 1},
            "properties": props,
        }

    # -- transport
    def install(self):
        import requests
        from azure.core.pipeline.policies import BearerTokenCredentialPolicy

        fake = self

        def send(session, request, **kwargs):
            return fake._respond(request)

        def on_request(policy, request):
            request.http_request.headers["Authorization"] = "Bearer fake-arm-token"

        requests.Session.send = send
        BearerTokenCredentialPolicy.on_request = on_request

    def _respond(self, request):
        import json as _json
        import urllib.parse

        url = urllib.parse.urlsplit(request.url)
        if url.hostname.endswith(".blob.core.windows.net"):  # a file upload, not JSON
            return self._blob(request, url)
        body = request.body
        if isinstance(body, bytes):
            body = body.decode()
        parsed = _json.loads(body) if body else None
        call = {
            "method": request.method,
            "host": url.hostname,
            "path": url.path,
            "body": parsed,
            "headers": {
                k: v
                for k, v in request.headers.items()
                if k.lower() in ("authorization", "azureml-model-deployment", "content-type")
            },
        }
        self.calls.append(call)
        if url.hostname.endswith(".inference.ml.azure.com") and url.path == "/jobs":
            status, answer = self._invoke(url, request, parsed)
        elif url.hostname.endswith(".inference.ml.azure.com"):
            status, answer = self._score(url, request, parsed)
        else:
            status, answer = self._arm(request.method, url.path, parsed)
        return self._response(request, status, answer)

    @staticmethod
    def _response(request, status, answer, extra_headers=None):
        import io
        import json as _json

        import requests
        import urllib3

        content = (
            b"" if answer is None else (answer.encode() if isinstance(answer, str) else _json.dumps(answer).encode())
        )
        headers = {
            "Content-Type": "application/json" if not isinstance(answer, str) else "text/plain",
            "Content-Length": str(len(content)),
            **(extra_headers or {}),
        }
        response = requests.Response()
        response.status_code = status
        response.headers = requests.structures.CaseInsensitiveDict(headers)
        response.raw = urllib3.HTTPResponse(
            body=io.BytesIO(content), headers=headers, status=status, preload_content=False
        )
        response.url = request.url
        response.request = request
        response.encoding = "utf-8"
        response.reason = {200: "OK", 201: "Created", 202: "Accepted", 404: "Not Found"}.get(status, "Error")
        return response

    def _not_found(self, what):
        return 404, {"error": {"code": "NotFound", "message": f"{what} not found"}}

    def _arm(self, method, path, body):
        if not path.startswith(self.prefix):
            return self._not_found(path)
        rest = path[len(self.prefix) :].strip("/").split("/")
        if rest == [""]:
            return 200, {
                "id": self.prefix,
                "name": self.prefix.rsplit("/", 1)[-1],
                "location": self.location,
                "properties": {},
            }
        if rest[0] in ("computes", "datastores", "codes", "environments", "batchEndpoints"):
            return self._batch_arm(method, rest, body)
        if rest[0] != "onlineEndpoints":
            return self._not_found(path)
        if len(rest) == 1:
            return 200, {"value": list(self.endpoints.values())}
        name = rest[1]
        if len(rest) == 2:
            if method == "GET":
                return (200, self.endpoints[name]) if name in self.endpoints else self._not_found(f"endpoint {name}")
            if method == "PUT":
                self.endpoints[name] = self._endpoint_resource(name, body)
                return 201, self.endpoints[name]
            if method == "PATCH":
                if name not in self.endpoints:
                    return self._not_found(f"endpoint {name}")
                traffic = (body.get("properties") or {}).get("traffic")
                if traffic is not None:
                    unknown = [d for d in traffic if (name, d) not in self.deployments]
                    if unknown or sum(traffic.values()) not in (0, 100):
                        return 400, {"error": {"code": "BadArgument", "message": f"bad traffic {traffic}"}}
                    self.endpoints[name]["properties"]["traffic"] = traffic
                return 200, self.endpoints[name]
            if method == "DELETE":
                self.endpoints.pop(name, None)
                return 200, None
        if len(rest) == 3 and rest[2] == "listKeys" and method == "POST":
            return 200, {"primaryKey": self.key, "secondaryKey": "fake-secondary-key"}
        if len(rest) >= 3 and rest[2] == "deployments":
            if name not in self.endpoints:
                return self._not_found(f"endpoint {name}")
            if len(rest) == 3:
                return 200, {"value": [d for (e, _), d in self.deployments.items() if e == name]}
            key = (name, rest[3])
            if method == "GET":
                return (200, self.deployments[key]) if key in self.deployments else self._not_found(f"deployment {key}")
            if method in ("PUT", "PATCH"):
                self.deployments[key] = self._deployment_resource(name, rest[3], body)
                return 200, self.deployments[key]
            if method == "DELETE":
                if self.endpoints[name]["properties"]["traffic"].get(rest[3], 0) > 0:
                    return 400, {"error": {"code": "BadArgument", "message": "deployment has traffic"}}
                self.deployments.pop(key, None)
                return 200, None
        return self._not_found(path)

    def _score(self, url, request, body):
        endpoint = url.hostname.split(".")[0]
        if url.path.endswith("swagger.json"):
            return 200, {"openapi": "3.0.1", "components": {"schemas": {}}}
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return 401, "unauthorized"
        traffic = self.endpoints[endpoint]["properties"]["traffic"]
        name = request.headers.get("azureml-model-deployment") or max(traffic, key=traffic.get)
        model = self.deployments[(endpoint, name)]["properties"]["model"].split("/")
        self.scores.append(
            {
                "deployment": name,
                "model": f"{model[-3]}/{model[-1]}",
                "columns": (body.get("input_data") or {}).get("columns"),
            }
        )
        try:
            import mlflow.pyfunc
            import pandas as pd

            split = body["input_data"]
            frame = pd.DataFrame(split["data"], columns=split["columns"], index=split.get("index"))
            result = mlflow.pyfunc.load_model(f"models:/{model[-3]}/{model[-1]}").predict(frame)
            return 200, pd.DataFrame(result).to_dict(orient="records")
        except Exception:
            return 500, self.SCORING_ERROR

    # -- batch endpoints
    def _resource(self, kind, rest, body, **props):
        properties = {**dict((body or {}).get("properties") or {}), **props, "provisioningState": "Succeeded"}
        return {
            "id": f"{self.prefix}/{'/'.join(rest)}",
            "name": rest[-1],
            "type": kind,
            "location": (body or {}).get("location") or self.location,
            "tags": (body or {}).get("tags") or {},
            "properties": properties,
        }

    def _batch_arm(self, method, rest, body):
        kind = rest[0]
        if kind == "computes" and len(rest) == 2 and method == "GET":
            if rest[1] not in self.computes:
                return self._not_found(f"compute {rest[1]}")
            return 200, self._resource(
                "computes",
                rest,
                {"properties": {"computeType": "AmlCompute", "properties": {"vmSize": "STANDARD_DS3_V2"}}},
            )
        if kind == "datastores" and rest[1:] == ["workspaceblobstore"] and method == "GET":
            return 200, self._resource(
                "datastores",
                rest,
                {
                    "properties": {
                        "datastoreType": "AzureBlob",
                        "accountName": "stcars",
                        "containerName": "azureml-blobstore",
                        "endpoint": "core.windows.net",
                        "protocol": "https",
                        "isDefault": True,
                        "credentials": {"credentialsType": "AccountKey"},
                    }
                },
            )
        if kind == "datastores" and rest[1:] == ["workspaceblobstore", "listSecrets"] and method == "POST":
            return 200, {"secretsType": "AccountKey", "key": "ZmFrZS1hY2NvdW50LWtleQ=="}
        if kind in ("codes", "environments") and len(rest) == 4 and rest[2] == "versions":
            key = "/".join(rest)
            if method == "GET":
                return (200, self.assets[key]) if key in self.assets else self._not_found(key)
            if method == "PUT":
                self.assets[key] = self._resource(kind, rest, body)
                return 200, self.assets[key]
        if kind == "batchEndpoints" and len(rest) == 2:
            name = rest[1]
            if method == "GET":
                return (200, self.batch_endpoints[name]) if name in self.batch_endpoints else self._not_found(name)
            if method == "PUT":
                self.batch_endpoints[name] = self._resource(
                    "batchEndpoints",
                    rest,
                    body,
                    scoringUri=f"https://{name}.{self.location}.inference.ml.azure.com/jobs",
                    defaults=(self.batch_endpoints.get(name, {}).get("properties") or {}).get("defaults"),
                )
                return 200, self.batch_endpoints[name]
            if method == "PATCH":
                if name not in self.batch_endpoints:
                    return self._not_found(name)
                defaults = (body.get("properties") or {}).get("defaults")
                if defaults and (name, defaults.get("deploymentName")) not in self.batch_deployments:
                    return 400, {"error": {"code": "BadArgument", "message": f"no deployment {defaults}"}}
                self.batch_endpoints[name]["properties"]["defaults"] = defaults
                return 200, self.batch_endpoints[name]
        if kind == "batchEndpoints" and len(rest) == 4 and rest[2] == "deployments":
            if rest[1] not in self.batch_endpoints:
                return self._not_found(f"batch endpoint {rest[1]}")
            key = (rest[1], rest[3])
            if method == "GET":
                return (200, self.batch_deployments[key]) if key in self.batch_deployments else self._not_found(rest[3])
            if method == "PUT":
                props = (body or {}).get("properties") or {}
                code = props.get("codeConfiguration", {}).get("codeId", "").split(f"{self.prefix}/")[-1]
                environment = props.get("environmentId", "").split(f"{self.prefix}/")[-1]
                missing = [a for a in (code, environment) if a not in self.assets]
                if missing:
                    return 400, {"error": {"code": "BadArgument", "message": f"unknown assets {missing}"}}
                self.batch_deployments[key] = self._resource("deployments", rest, body)
                return 200, self.batch_deployments[key]
        return self._not_found("/".join(rest))

    def _blob(self, request, url):
        import email.utils

        body = request.body
        data = body if isinstance(body, bytes) else (body or "").encode() if isinstance(body, str) else b"".join(body)
        self.calls.append(
            {"method": request.method, "host": url.hostname, "path": url.path, "body": None, "headers": {}}
        )
        if request.method != "PUT" or "SharedKey stcars:" not in request.headers.get("Authorization", ""):
            return self._response(request, 403, "AuthenticationFailed")
        self.blobs[f"{url.hostname.split('.')[0]}{url.path}"] = data
        headers = {
            "ETag": '"0x8DC0FFEE"',
            "Last-Modified": email.utils.formatdate(usegmt=True),
            "x-ms-request-id": "fake-request",
            "x-ms-version": request.headers.get("x-ms-version", "2021-08-06"),
            "x-ms-request-server-encrypted": "true",
            "Date": email.utils.formatdate(usegmt=True),
        }
        return self._response(request, 201, None, headers)

    def _invoke(self, url, request, body):
        endpoint = url.hostname.split(".")[0]
        if request.headers.get("Authorization") != "Bearer fake-arm-token":
            return 401, "unauthorized"
        if endpoint not in self.batch_endpoints:
            return 404, {"error": {"code": "NotFound", "message": f"endpoint {endpoint} not found"}}
        name = f"batchjob-{len(self.jobs) + 1:04d}"
        self.jobs.append({"endpoint": endpoint, "name": name, "body": body})
        return 200, {"id": f"{self.prefix}/jobs/{name}", "name": name, "properties": {"status": "NotStarted"}}
