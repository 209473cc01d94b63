"""A model folder is checked at load: tampered copies of a saved tiny model fail there in one line naming the
file, and an unexpected failure inside predict reaches a REST client as one line, never a stack trace."""

from __future__ import annotations

import json
import pathlib
import shutil

import pandas as pd
import pytest
import requests

import carclf_flavor
from carclf.deployment.local_server import LocalServer, ServerStartError
from carclf_flavor.pyfunc import _CarClassifierPyfunc
from tests.helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes

SERVER_START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("checked") / "model"
    carclf_flavor.save_model(
        build_tiny_resnet(seed=7),
        path,
        CLASS_NAMES,
        preprocessing=carclf_flavor.PreprocessSettings(image_size=IMAGE_SIZE),
        inference_precision="float32",
    )
    return path


def _tampered(model_dir: pathlib.Path, tmp_path: pathlib.Path, file: str, content) -> pathlib.Path:
    copy = tmp_path / "tampered"
    shutil.copytree(model_dir, copy)
    target = copy / "data" / file
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return copy


def _preprocessing(model_dir, **changes) -> str:
    record = json.loads((model_dir / "data" / "preprocessing.json").read_text())
    return json.dumps(dict(record, **changes))


HOSTILE = {
    "image size far too large": (
        "preprocessing.json",
        lambda d: _preprocessing(d, image_size=30000),
        "image_size 30000 is outside 16..2048",
    ),
    "image size not the network's": (
        "preprocessing.json",
        lambda d: _preprocessing(d, image_size=64),
        f"image_size 64 but the network in model.keras takes {IMAGE_SIZE}x{IMAGE_SIZE} images",
    ),
    "bad crop mode": ("preprocessing.json", lambda d: _preprocessing(d, crop="zoom"), "crop must be one of"),
    "preprocessing not UTF-8": (
        "preprocessing.json",
        lambda d: b'{"crop": "\xff"}',
        "not UTF-8 text (byte 10 is 0xff)",
    ),
    "preprocessing not an object": ("preprocessing.json", lambda d: "[224]", "expected a JSON object"),
    "too few class names": (
        "classes.json",
        lambda d: json.dumps(CLASS_NAMES[:3]),
        f"3 class names but the network in model.keras has {len(CLASS_NAMES)} outputs",
    ),
    "classes not JSON": ("classes.json", lambda d: "car, truck", "not valid JSON (Expecting value at line 1 column 1)"),
    "classes not a list": ("classes.json", lambda d: '{"0": "car"}', "expected a non-empty JSON list of class names"),
    "class not a name": ("classes.json", lambda d: json.dumps([*CLASS_NAMES[:3], 7]), "class 3 is a int, not a name"),
    "classes file too large": (
        "classes.json",
        lambda d: b"[" + b'"x",' * (4 * 1024 * 1024 + 1) + b'"y"]',
        "bytes, above the 16777216 a model's JSON file may hold",
    ),
    "network not a Keras file": ("model.keras", lambda d: b"PK\x03\x04 not a zip", "cannot load the network"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_model_file_fails_at_load_in_one_line_naming_it(model_dir, tmp_path, case):
    import mlflow

    file, content, problem = HOSTILE[case]
    tampered = _tampered(model_dir, tmp_path, file, content(model_dir))
    for load in (lambda: mlflow.pyfunc.load_model(str(tampered)), lambda: carclf_flavor.load_model(str(tampered))):
        with pytest.raises(carclf_flavor.ModelFileError) as raised:
            load()
        message = str(raised.value)
        assert message.startswith(str(tampered / "data" / file) + ": ") and problem in message
        assert "\n" not in message


def test_unexpected_error_in_predict_is_one_line_and_logged_in_full(model_dir, caplog):
    """A fault no request check foresaw (here: fewer names than the network's outputs, past the load check)."""
    classifier = carclf_flavor.load_model(str(model_dir))
    classifier.class_names = classifier.class_names[:1]
    model = _CarClassifierPyfunc(classifier)
    with pytest.raises(carclf_flavor.InternalModelError) as raised:
        model.predict(pd.DataFrame({"image": [jpeg_bytes()]}))
    assert raised.value.message.startswith("internal error in the carclf model (IndexError: list index out of range)")
    assert raised.value.get_http_status_code() == 500
    assert "Traceback" in caplog.text and "IndexError" in caplog.text


def test_rest_client_gets_one_line_without_a_stack_trace_for_an_unexpected_error(model_dir, tmp_path):
    """The shipped code of a copy is made to fail inside predict: what the client of `mlflow models serve`
    reads is one line, and the server's log holds the traceback."""
    import base64

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    with open(broken / "code" / "carclf_flavor" / "classifier.py", "a") as handle:
        handle.write(
            "\n\ndef _rank_fails(self, probs, top_k):\n"
            "    return [self.class_names[len(self.class_names)] for _ in probs]\n\n\n"
            "CarClassifier._rank = _rank_fails\n"
        )
    log = tmp_path / "server.log"
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    try:
        served = LocalServer(broken, log, env=env, cwd=tmp_path, startup_timeout_s=SERVER_START_TIMEOUT_S)
    except ServerStartError as exc:
        pytest.fail(f"mlflow models serve did not start: {exc}", pytrace=False)
    with served:
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg_bytes()).decode()]]}}
        response = requests.post(f"{served.url}/invocations", json=body, timeout=120)
    assert response.status_code == 500
    answer = response.json()
    assert answer["error_code"] == "INTERNAL_ERROR" and "stack_trace" not in answer, answer
    assert answer["message"].startswith("internal error in the carclf model (IndexError: list index out of range)")
    assert "\n" not in answer["message"] and "Traceback" not in response.text
    assert "Traceback" in log.read_text()


def test_serve_refuses_to_start_on_a_hostile_model_with_the_one_line(model_dir, tmp_path):
    tampered = _tampered(model_dir, tmp_path, "classes.json", json.dumps(CLASS_NAMES[:3]))
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    with pytest.raises(ServerStartError) as raised:
        with LocalServer(tampered, tmp_path / "server.log", env=env, cwd=tmp_path, startup_timeout_s=240):
            pass
    expected = f"{tampered / 'data' / 'classes.json'}: 3 class names but the network in model.keras has"
    assert expected in str(raised.value)
