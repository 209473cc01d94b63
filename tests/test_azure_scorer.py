"""A saved model under Azure ML's own no-code scorer: `mlflow_score_script.py` run by `azmlinfsrv`.

This is how a managed online endpoint serves an MLflow model deployed without a scoring script (see
`../shared/azure/README.md`): the server's own virtualenv holds only the model's `requirements.txt` plus
Azure's inference server, the script builds its samples from the model's signature and input example at boot,
and requests arrive as `{"input_data": {"columns", "index", "data"}, "params": {...}}`. `azmlinfsrv` binds
0.0.0.0 and has no host option: the launcher below sets its module constant to 127.0.0.1 before it starts.
"""

import base64
import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import requests

import carclf_flavor
from carclf.compute.ports import free_port
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.signature import top_k_entries
from conftest import REPO_ROOT
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, fresh_venv_python, jpeg_bytes
from helpers_processes import stop_process_group

pytestmark = pytest.mark.slow

AZURE_SCRIPT = REPO_ROOT.parent / "shared" / "azure" / "mlflow_score_script.py"
# What the curated mlflow-py312-inference image runs the script with (PyPI names and the versions measured).
AZURE_SERVER_PACKAGES = ("azureml-inference-server-http==1.5.1", "azureml-ai-monitoring==1.0.0")
LAUNCHER = """
import sys
from azureml_inference_server_http import amlserver
amlserver.DEFAULT_HOST = "127.0.0.1"  # loopback only: the server has no host option of its own
sys.argv = ["azmlinfsrv"] + sys.argv[1:]
sys.exit(amlserver.run())
"""
IMAGES = [jpeg_bytes(96 + 8 * i, 72 + 4 * i, seed=40 + i) for i in range(4)]
START_TIMEOUT_S = 300


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def input_data(*images, columns=("image",)):
    rows = [[image] if isinstance(image, str) else list(image) for image in images]
    return {"columns": list(columns), "index": list(range(len(rows))), "data": rows}


@pytest.fixture(scope="module")
def azure_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("azureml-models")
    path = root / "carclf-model"
    # With an int8 network: its requirements then include OpenVINO, which Azure installs at start, and
    # `auto` serves int8 where the CPU has AVX2. Calibrated on a few photos' pixels, not validated (a warning).
    calibration = np.stack([decode_and_resize(image) for image in IMAGES * 8])
    carclf_flavor.save_model(
        build_tiny_resnet(seed=11),
        path,
        CLASS_NAMES,
        preprocessing=PreprocessSettings(image_size=IMAGE_SIZE, crop="bbox", crop_margin=4),
        inference_precision="auto",
        calibration_data=calibration,
    )
    assert (path / "data" / "model_int8.xml").is_file() and "openvino" in (path / "requirements.txt").read_text()
    return path


def decode_and_resize(data: bytes) -> np.ndarray:
    from carclf_flavor.images import prepare_photo

    return prepare_photo(data, None, PreprocessSettings(image_size=IMAGE_SIZE, crop="none"))


@pytest.fixture(scope="module")
def azure_venv(azure_model, tmp_path_factory):
    """Azure's runtime install: the model's requirements.txt and the inference server, nothing of the repo."""
    assert AZURE_SCRIPT.is_file(), f"Azure's scoring script is missing: {AZURE_SCRIPT}"
    python, _ = fresh_venv_python(
        tmp_path_factory.mktemp("azure-venv"), azure_model / "requirements.txt", AZURE_SERVER_PACKAGES
    )
    return python


def _clean_env(**extra):
    # Without CARCLF_ERRORS: a model deployed from the studio or `az ml online-deployment create` has none.
    dropped = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "CARCLF_ERRORS")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def azure_server(azure_model, azure_venv, tmp_path_factory):
    app_root = tmp_path_factory.mktemp("azure-app")
    shutil.copy(AZURE_SCRIPT, app_root / "mlflow_score_script.py")
    (app_root / "launch_azmlinfsrv.py").write_text(LAUNCHER)
    port = free_port()
    log_path = app_root / "server.log"
    env = _clean_env(
        AZUREML_MODEL_DIR=str(azure_model.parent),
        MLFLOW_MODEL_FOLDER=azure_model.name,
        AZUREML_ENTRY_SCRIPT="mlflow_score_script.py",
    )
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(azure_venv), "launch_azmlinfsrv.py", "--entry_script", "mlflow_score_script.py", "--port", str(port)],
            cwd=app_root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"azmlinfsrv exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                # The readiness route answers only once the entry script has loaded the model.
                if (
                    requests.get(f"{url}/", timeout=2).status_code == 200
                    and "ready for serving" in log_path.read_text()
                ):
                    break
            except requests.exceptions.RequestException:  # refused, or accepted while the worker still loads
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"azmlinfsrv not up after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield {"url": url, "log": log_path, "model": azure_model}
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def reference(azure_model):
    return carclf_flavor.load_model(str(azure_model))


def score(server, body):
    return requests.post(
        f"{server['url']}/score", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=120
    )


def test_boots_with_samples_built_from_the_signature(azure_server):
    log = azure_server["log"].read_text()
    assert "Failed to get pandas types" not in log and "Users's init has completed successfully" in log
    swagger = requests.get(f"{azure_server['url']}/swagger.json", timeout=10)
    assert swagger.status_code == 200
    # The sample clients see on the swagger page is the model's own input example, as base64 text.
    assert "input_data" in swagger.text and "image" in swagger.text


def test_one_photo_scores_like_the_flavor(azure_server, reference):
    response = score(azure_server, {"input_data": input_data(b64(IMAGES[0]))})
    assert response.status_code == 200, response.text
    (answer,) = response.json()
    expected = reference.predict(IMAGES[0])[0]
    assert answer["label"] == expected["label"] and answer["class_id"] == expected["class_id"]
    # The same network and precision on both sides (int8 where the CPU has AVX2, as `auto` chose in the log).
    assert answer["prob"] == pytest.approx(expected["prob"], abs=1e-4)
    assert f"carclf model serving in {reference.precision}" in azure_server["log"].read_text()
    assert [entry["label"] for entry in top_k_entries(answer["top_k"])] == [
        entry["label"] for entry in expected["top_k"]
    ]
    assert answer["error"] is None


def test_batch_with_top_k_and_mime_base64(azure_server, reference):
    # MIME base64 (a line break every 76 characters) is what MLflow and many clients write.
    images = [
        b64(IMAGES[0]),
        base64.encodebytes(IMAGES[1]).decode("ascii"),
        "  " + b64(IMAGES[2]) + "\n",
        b64(IMAGES[3]),
    ]
    response = score(azure_server, {"input_data": input_data(*images), "params": {"top_k": 3}})
    assert response.status_code == 200, response.text
    answers = response.json()
    assert [a["label"] for a in answers] == [r["label"] for r in reference.predict(IMAGES)]
    assert all(len(top_k_entries(a["top_k"])) == 3 for a in answers)


def test_own_input_example_scores_as_it_is(azure_server):
    example = json.loads((azure_server["model"] / "input_example.json").read_text())
    body = {
        "input_data": {
            "columns": example["columns"],
            "index": list(range(len(example["data"]))),
            "data": example["data"],
        }
    }
    response = score(azure_server, body)
    assert response.status_code == 200, response.text
    assert response.json()[0]["label"] in CLASS_NAMES


def test_bad_photos_reach_the_client_as_row_errors_and_the_server_keeps_answering(azure_server):
    # No CARCLF_ERRORS (see _clean_env): the model itself recognises Azure's server, as its log says.
    assert (
        "carclf requests default to errors=coerce: model_config errors=auto under Azure's inference server "
        "(azureml_inference_server_http is loaded)" in azure_server["log"].read_text()
    )
    body = {"input_data": input_data(b64(IMAGES[0]), b64(b"this is not a photo"), "!" * 1000, b64(IMAGES[1][:200]))}
    response = score(azure_server, body)
    assert response.status_code == 200, response.text
    good, not_image, not_base64, truncated = response.json()
    assert good["error"] is None and good["label"] in CLASS_NAMES
    assert not_image["label"] is None and not_image["top_k"] == "[]"
    assert "not a recognised image format" in not_image["error"]
    assert not_base64["error"] == "image is text but not base64: character '!' at position 0"
    assert truncated["error"] and "\n" not in truncated["error"]
    response = score(azure_server, {"input_data": input_data(b64(IMAGES[2]))})
    assert response.status_code == 200 and response.json()[0]["error"] is None
