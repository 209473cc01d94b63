"""`entry_points.score` as the client of both services, against a real HTTP server on 127.0.0.1.

The server is a stand-in that checks every request the way the two real services read it: MLflow's
`/invocations` (`dataframe_split`) and an Azure ML online endpoint's `/score` (Azure's no-code scoring script:
`input_data` as a pandas split frame with its index, `params`, bearer key, optional `azureml-model-deployment`
header). It answers both with the same predictions, so the client's output can be compared. The real Azure
scorer (Azure's script under `azmlinfsrv`) is tested elsewhere; this file is about the client.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import REPO_ROOT
from helpers_deploy import tiny_jpeg

KEY = "k3y-for-tests"
BAD = b"not a photo at all"


class StandIn(http.server.BaseHTTPRequestHandler):
    requests_seen: list = []

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _answer(self, status, body):
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    @staticmethod
    def _predict(images, top_k):
        rows = []
        for data in images:
            if data == BAD:  # what a deployment with errors=coerce answers for a bad photo
                rows.append(
                    {
                        "label": None,
                        "class_id": None,
                        "prob": None,
                        "top_k": [],
                        "error": "row 0: not a recognised image format (expected JPEG, PNG or WebP)",
                    }
                )
                continue
            size = len(data)
            ranked = [{"label": f"Car {(size + i) % 7}", "prob": round(0.6 / (i + 1), 4)} for i in range(top_k)]
            rows.append(
                {
                    "label": ranked[0]["label"],
                    "class_id": size % 7,
                    "prob": ranked[0]["prob"],
                    "top_k": ranked,
                    "error": None,
                }
            )
        return rows

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        seen = {
            "path": self.path,
            "body": body,
            "authorization": self.headers.get("Authorization"),
            "deployment": self.headers.get("azureml-model-deployment"),
            "content_type": self.headers.get("Content-Type"),
        }
        StandIn.requests_seen.append(seen)
        if self.path == "/invocations":
            frame = body["dataframe_split"]
            wrap = True
        elif self.path == "/score":
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._answer(401, "key_auth_access_denied")
            if set(body) != {"input_data", "params"} or set(body["input_data"]) != {"columns", "index", "data"}:
                return self._answer(
                    500, "An unexpected error occurred in scoring script. Check the logs for more info."
                )
            frame = body["input_data"]
            if frame["index"] != list(range(len(frame["data"]))):
                return self._answer(400, {"error": "index does not match data"})
            if self.headers.get("azureml-model-deployment") == "broken":
                return self._answer(
                    500, "An unexpected error occurred in scoring script. Check the logs for more info."
                )
            wrap = False
        else:
            return self._answer(404, {"message": "no such path"})
        column = frame["columns"].index("image")
        images = [base64.b64decode(row[column], validate=True) for row in frame["data"]]
        rows = self._predict(images, int(body["params"]["top_k"]))
        if wrap:  # mlflow models serve: errors=raise by default, a bad photo is a 400
            if any(r["error"] for r in rows):
                return self._answer(400, {"error_code": "BAD_REQUEST", "message": "row 1: not a recognised image"})
            rows = [{k: v for k, v in r.items() if k != "error"} for r in rows]
        return self._answer(200, {"predictions": rows} if wrap else rows)


@pytest.fixture
def stand_in():
    StandIn.requests_seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _score(args, env_key=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "AZUREML_ENDPOINT_KEY"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if env_key is not None:
        env["AZUREML_ENDPOINT_KEY"] = env_key
    return subprocess.run(
        [sys.executable, "-m", "entry_points.score", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture
def photos(tmp_path):
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"car{seed}.jpg")
        paths[-1].write_bytes(tiny_jpeg(32 + 8 * seed, seed=seed))
    return paths


def test_azure_endpoint_body_headers_and_the_same_output_as_mlflow_serve(stand_in, photos, tmp_path):
    azure = _score(
        [
            "--azure-endpoint",
            f"{stand_in}/score",
            *photos,
            "--top-k",
            "3",
            "--json",
            "--batch-size",
            "2",
            "--deployment",
            "green",
        ],
        env_key=KEY,
    )
    assert azure.returncode == 0, azure.stderr
    azure_requests = list(StandIn.requests_seen)
    assert len(azure_requests) == 2  # 3 photos, 2 per request
    for seen, chunk in zip(azure_requests, (photos[:2], photos[2:])):
        assert seen["path"] == "/score" and seen["authorization"] == f"Bearer {KEY}"
        assert seen["deployment"] == "green" and seen["content_type"] == "application/json"
        frame = seen["body"]["input_data"]
        assert frame["columns"] == ["image"] and frame["index"] == list(range(len(chunk)))
        assert [base64.b64decode(row[0]) for row in frame["data"]] == [p.read_bytes() for p in chunk]
        assert seen["body"]["params"] == {"top_k": 3}

    StandIn.requests_seen = []
    mlflow_serve = _score(["--url", stand_in, *photos, "--top-k", "3", "--json", "--batch-size", "2"])
    assert mlflow_serve.returncode == 0, mlflow_serve.stderr
    assert StandIn.requests_seen[0]["path"] == "/invocations" and "dataframe_split" in StandIn.requests_seen[0]["body"]
    assert StandIn.requests_seen[0]["authorization"] is None and StandIn.requests_seen[0]["deployment"] is None

    from_azure = [{k: v for k, v in r.items() if k != "error"} for r in json.loads(azure.stdout)]
    assert from_azure == json.loads(mlflow_serve.stdout)
    assert [r["file"] for r in from_azure] == [str(p) for p in photos] and all(len(r["top_k"]) == 3 for r in from_azure)

    # The table is the same too; --key wins over the environment; no --deployment -> no header.
    table_azure = _score(["--azure-endpoint", f"{stand_in}/score", photos[0], "--key", KEY], env_key="wrong")
    table_mlflow = _score(["--url", stand_in, photos[0]])
    assert table_azure.returncode == 0, table_azure.stderr
    assert table_azure.stdout == table_mlflow.stdout and "Car " in table_azure.stdout
    assert StandIn.requests_seen[-2]["deployment"] is None


def test_a_bad_photo_reaches_the_azure_client_as_its_error_row(stand_in, photos, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(BAD)
    result = _score(["--azure-endpoint", f"{stand_in}/score", photos[0], bad], env_key=KEY)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith(str(photos[0])) and "Car " in lines[1]
    assert lines[2].startswith(str(bad)) and "error: row 0: not a recognised image format" in lines[2]


@pytest.mark.parametrize(
    "args, env_key, expected",
    [
        (["--key", "wrong"], None, "refused the key (HTTP 401): check --key or AZUREML_ENDPOINT_KEY"),
        ([], None, "--azure-endpoint needs the endpoint key: pass --key or set AZUREML_ENDPOINT_KEY"),
        ([], "  ", "--azure-endpoint needs the endpoint key"),
        (["--deployment", "broken"], KEY, "HTTP 500): An unexpected error occurred in scoring script"),
        (["--deployment", "9lives"], KEY, "--deployment '9lives' is not an Azure deployment name"),
        (
            ["--url", "http://127.0.0.1:5000"],
            KEY,
            "give --url (mlflow models serve) or --azure-endpoint (Azure ML), not both",
        ),
    ],
)
def test_azure_client_errors_are_one_line_naming_the_parameter(stand_in, photos, args, env_key, expected):
    result = _score(["--azure-endpoint", f"{stand_in}/score", photos[0], *args], env_key=env_key)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_azure_flags_refused_without_azure_endpoint_and_bad_urls(stand_in, photos):
    for args, expected in (
        (["--key", KEY], "--key is for --azure-endpoint"),
        (["--deployment", "green"], "--deployment is for --azure-endpoint"),
    ):
        result = _score(["--url", stand_in, photos[0], *args])
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr
    result = _score(["--azure-endpoint", "car-resnet", photos[0]], env_key=KEY)
    assert result.returncode == 2 and "--azure-endpoint 'car-resnet' is not a URL" in result.stderr
