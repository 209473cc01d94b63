"""The served model for real: `mlflow models serve` on 127.0.0.1, the score client, spark_udf, a fresh virtualenv."""

import base64
import json
import logging
import os
import pathlib
import struct
import subprocess
import sys
import threading
import zlib

import pandas as pd
import pytest
import requests

import carclf_flavor
from carclf.compute.ports import free_port
from carclf.deployment.local_server import LocalServer, ServerStartError
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.signature import top_k_entries
from conftest import REPO_ROOT
from helpers_flavor import (
    CLASS_NAMES,
    IMAGE_SIZE,
    build_tiny_resnet,
    fresh_venv_python,
    jpeg_bytes,
    varied_format_images,
)

SETTINGS = PreprocessSettings(image_size=IMAGE_SIZE, crop="bbox", crop_margin=4)
IMAGES = [jpeg_bytes(90 + 9 * i, 70 + 5 * i, seed=10 + i) for i in range(6)]
SERVER_START_TIMEOUT_S = 240


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _subprocess_env(**extra):
    env = dict(os.environ)
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    # `mlflow models serve` execs `uvicorn` by name: this interpreter's bin folder must come first on PATH.
    env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def png_bomb(width=10_000, height=8_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb: 80 MP)."""
    raw = b"\x00" + b"\x00\x00\x00" * 1

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("served") / "model"
    carclf_flavor.save_model(
        build_tiny_resnet(seed=3), path, CLASS_NAMES, preprocessing=SETTINGS, inference_precision="float32"
    )
    return path


@pytest.fixture(scope="module")
def classifier(model_dir):
    return carclf_flavor.load_model(str(model_dir))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One `mlflow models serve` per module: starting it imports TensorFlow (slow on 2 shared cores)."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    try:
        served = LocalServer(
            model_dir,
            log_path,
            env={"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"},
            cwd=log_path.parent,
            startup_timeout_s=SERVER_START_TIMEOUT_S,
        )
    except ServerStartError as exc:
        pytest.fail(f"mlflow models serve did not start: {exc}", pytrace=False)
    with served:
        yield {"url": served.url, "log": log_path}


def invoke(server, body, timeout=60):
    return requests.post(
        f"{server['url']}/invocations",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )


def test_seed_shaped_request(server, classifier):
    response = invoke(server, {"dataframe_split": {"columns": ["image"], "data": [[b64(IMAGES[0])]]}})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    expected = classifier.predict(IMAGES[0])[0]
    assert prediction["label"] == expected["label"] and prediction["class_id"] == expected["class_id"]
    assert isinstance(prediction["prob"], float)
    assert prediction["prob"] == pytest.approx(expected["prob"], abs=1e-5)
    assert len(top_k_entries(prediction["top_k"])) == min(5, len(CLASS_NAMES))


def test_load_log_line_names_precision_and_reason(server):
    log = server["log"].read_text()
    assert "carclf model serving in float32: saved inference_precision=float32 forces it" in log


def test_batch_with_top_k_param(server, classifier):
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(i)] for i in IMAGES]}, "params": {"top_k": 2}}
    response = invoke(server, body)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected = classifier.predict(IMAGES, top_k=2)
    assert all(isinstance(p["top_k"], str) for p in predictions)  # the signature's JSON text column
    ranked = [top_k_entries(p["top_k"]) for p in predictions]
    assert ranked == [[pytest.approx(e, abs=1e-5) for e in x["top_k"]] for x in expected]
    assert all(len(r) == 2 for r in ranked)


def test_dataframe_records_with_bbox(server, classifier):
    bbox = (10, 5, 70, 60)
    records = [
        {"image": b64(IMAGES[1]), "bbox_x1": bbox[0], "bbox_y1": bbox[1], "bbox_x2": bbox[2], "bbox_y2": bbox[3]}
    ]
    response = invoke(server, {"dataframe_records": records})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    expected = classifier.predict([IMAGES[1]], bboxes=[bbox])[0]
    assert prediction["prob"] == pytest.approx(expected["prob"], abs=1e-5)
    assert prediction["label"] == expected["label"]


def test_batch_mixing_rows_with_and_without_bbox(server, classifier):
    bbox = (10, 5, 70, 60)
    body = _split([b64(IMAGES[1]), *bbox], [b64(IMAGES[2]), None, None, None, None], columns=BBOX_COLUMNS)
    response = invoke(server, body)
    assert response.status_code == 200, response.text
    with_box, without = response.json()["predictions"]
    expected = classifier.predict([IMAGES[1], IMAGES[2]], bboxes=[bbox, None])
    assert with_box["prob"] == pytest.approx(expected[0]["prob"], abs=1e-5)
    assert without["prob"] == pytest.approx(expected[1]["prob"], abs=1e-5)


def test_varied_formats_over_rest(server):
    images = list(varied_format_images().values())
    response = invoke(server, {"dataframe_split": {"columns": ["image"], "data": [[b64(i)] for i in images]}})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == len(images)


def test_coerce_over_rest(server):
    body = {
        "dataframe_split": {"columns": ["image"], "data": [[b64(IMAGES[0])], [b64(b"garbage")]]},
        "params": {"errors": "coerce"},
    }
    response = invoke(server, body)
    assert response.status_code == 200, response.text
    good, bad = response.json()["predictions"]
    assert good["error"] is None and good["label"] in CLASS_NAMES
    assert (
        bad["label"] is None
        and bad["prob"] is None
        and bad["top_k"] == "[]"
        and "not a recognised image format" in bad["error"]
    )


def _split(*rows, columns=("image",)):
    return {"dataframe_split": {"columns": list(columns), "data": [list(r) for r in rows]}}


BBOX_COLUMNS = ("image", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
BAD_REQUESTS = {
    "undecodable bytes": (
        _split([b64(IMAGES[0])], [b64(b"this is not an image")]),
        "row 1: not a recognised image format",
    ),
    "invalid base64 (length)": (_split(["abcde"]), "row 0: image is text but not valid base64 (Invalid base64-encoded"),
    "invalid base64 (padding)": (_split(["abc"]), "row 0: image is text but not valid base64 (Incorrect padding)"),
    "text that is not base64": (
        _split(["!" * 1000]),
        "row 0: image is text but not base64: character '!' at position 0",
    ),
    "empty image": (_split([""]), "row 0: empty image (0 bytes)"),
    "null image": (_split([None]), "row 0: image is missing (null)"),
    "truncated jpeg": (_split([b64(IMAGES[0][:300])]), "row 0: "),
    "decompression bomb": (
        _split([b64(png_bomb())]),
        "row 0: image is 10000x8000 = 80.0 megapixels, above the limit of 50.0",
    ),
    "missing image column": (_split([b64(IMAGES[0])], columns=("picture",)), "input has no 'image' column: send"),
    "bare list of images": ({"inputs": [b64(IMAGES[0])]}, "input has no 'image' column: send"),
    "bbox outside image": (
        _split([b64(IMAGES[0]), 500, 500, 600, 700], columns=BBOX_COLUMNS),
        "row 0: bbox (500, 500, 600, 700) lies outside the 90x70 image",
    ),
    "inverted bbox": (
        _split([b64(IMAGES[0]), 50, 10, 20, 40], columns=BBOX_COLUMNS),
        "row 0: bbox (50, 10, 20, 40) is empty or inverted",
    ),
    "non-integer bbox": (
        _split([b64(IMAGES[0]), 1.5, 2, 30, 40], columns=BBOX_COLUMNS),
        "row 0: bbox_x1 must be an integer, got 1.5",
    ),
    "text bbox": (
        _split([b64(IMAGES[0]), "left", 2, 30, 40], columns=BBOX_COLUMNS),
        "row 0: bbox_x1 must be an integer, got 'left'",
    ),
    "incomplete bbox": (
        _split([b64(IMAGES[0]), 1, 2, 30, 40], [b64(IMAGES[1]), 1, None, 30, 40], columns=BBOX_COLUMNS),
        "row 1: bbox is incomplete: bbox_y1 missing",
    ),
    "top_k zero": ({**_split([b64(IMAGES[0])]), "params": {"top_k": 0}}, "params.top_k must be an integer >= 1, got 0"),
    "top_k text": ({**_split([b64(IMAGES[0])]), "params": {"top_k": "many"}}, "top_k"),
    "errors mode": (
        {**_split([b64(IMAGES[0])]), "params": {"errors": "skip"}},
        "params.errors must be one of raise, coerce",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_a_clean_400(server, name):
    body, expected = BAD_REQUESTS[name]
    response = invoke(server, body)
    assert response.status_code == 400, response.text
    payload = response.json()
    assert "stack_trace" not in payload
    assert expected in payload["message"], payload["message"]
    if expected.startswith(("row ", "params.", "input has")):
        assert "\n" not in payload["message"] and payload["error_code"] == "INVALID_PARAMETER_VALUE"


REQUEST_FORMATS = {
    "dataframe_split": lambda image: {"dataframe_split": {"columns": ["image"], "data": [[image]]}},
    "dataframe_records": lambda image: {"dataframe_records": [{"image": image}]},
    "inputs as columns": lambda image: {"inputs": {"image": [image]}},
    "instances": lambda image: {"instances": [{"image": image}]},
    "MIME base64": lambda image: {
        "dataframe_split": {"columns": ["image"], "data": [[base64.encodebytes(base64.b64decode(image)).decode()]]}
    },
}


@pytest.mark.parametrize("name", list(REQUEST_FORMATS))
def test_every_request_format_scores_the_same_photo(server, classifier, name):
    response = invoke(server, {**REQUEST_FORMATS[name](b64(IMAGES[2])), "params": {"top_k": 2}})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    expected = classifier.predict(IMAGES[2], top_k=2)[0]
    assert prediction["label"] == expected["label"] and len(top_k_entries(prediction["top_k"])) == 2
    assert prediction["prob"] == pytest.approx(expected["prob"], abs=1e-5)


def test_request_limits_are_one_line_refusals(model_dir, monkeypatch):
    import mlflow

    model = mlflow.pyfunc.load_model(str(model_dir), model_config={"max_images_per_request": 3})
    frame = pd.DataFrame({"image": IMAGES[:3]})
    assert len(model.predict(frame)) == 3
    with pytest.raises(
        carclf_flavor.InvalidInputError, match=r"^request has 4 images, above the limit of 3 per request"
    ):
        model.predict(pd.DataFrame({"image": IMAGES[:4]}))
    monkeypatch.setenv("CARCLF_MAX_REQUEST_BYTES", str(len(IMAGES[0]) + len(IMAGES[1]) - 1))
    model = mlflow.pyfunc.load_model(str(model_dir))
    with pytest.raises(carclf_flavor.InvalidInputError, match="request's images add up to more than .* bytes by row 1"):
        model.predict(pd.DataFrame({"image": IMAGES[:2]}))
    monkeypatch.setenv("CARCLF_MAX_REQUEST_BYTES", "lots")
    with pytest.raises(ValueError, match="CARCLF_MAX_REQUEST_BYTES must be a positive integer, got 'lots'"):
        mlflow.pyfunc.load_model(str(model_dir))


def test_deployment_error_mode_makes_bad_rows_answers(model_dir, monkeypatch):
    """CARCLF_ERRORS=coerce (what `deploy` sets on Azure) turns the default `errors=auto` into coerce."""
    import mlflow

    monkeypatch.setenv("CARCLF_ERRORS", "coerce")
    model = mlflow.pyfunc.load_model(str(model_dir))
    frame = model.predict(pd.DataFrame({"image": [IMAGES[0], b"junk"]}))
    assert frame.error[0] is None and "not a recognised image format" in frame.error[1]
    with pytest.raises(carclf_flavor.InvalidInputError, match="row 1: not a recognised image format"):
        model.predict(pd.DataFrame({"image": [IMAGES[0], b"junk"]}), params={"errors": "raise"})
    monkeypatch.setenv("CARCLF_ERRORS", "ignore")
    with pytest.raises(ValueError, match="CARCLF_ERRORS must be one of raise, coerce, auto, got 'ignore'"):
        mlflow.pyfunc.load_model(str(model_dir))


def test_errors_auto_is_coerce_under_azures_inference_server_and_raise_elsewhere(model_dir, monkeypatch, caplog):
    """The saved default is auto: a model deployed on Azure without `deploy` (no CARCLF_ERRORS) answers bad
    photos as rows; an explicit mode (variable, model_config as models saved with "raise" carry, request) wins."""
    import mlflow

    from carclf_flavor.pyfunc import azure_inference_server

    bad_batch = pd.DataFrame({"image": [IMAGES[0], b"junk"]})
    monkeypatch.delenv("CARCLF_ERRORS", raising=False)
    monkeypatch.delenv("AZUREML_ENTRY_SCRIPT", raising=False)
    with caplog.at_level(logging.INFO, logger="mlflow.carclf"):
        model = mlflow.pyfunc.load_model(str(model_dir))
    assert (
        "carclf requests default to errors=raise: model_config errors=auto, not under Azure's inference server"
        in caplog.text
    )
    with pytest.raises(carclf_flavor.InvalidInputError, match="row 1: not a recognised image format"):
        model.predict(bad_batch)

    monkeypatch.setenv("AZUREML_ENTRY_SCRIPT", "mlflow_score_script.py")  # as Azure's server image sets it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlflow.carclf"):
        model = mlflow.pyfunc.load_model(str(model_dir))
    assert (
        "carclf requests default to errors=coerce: model_config errors=auto under Azure's inference server "
        "(AZUREML_ENTRY_SCRIPT is set)" in caplog.text
    )
    frame = model.predict(bad_batch)
    assert frame.error[0] is None and frame.label[0] in CLASS_NAMES
    assert frame.label[1] is None and "not a recognised image format" in frame.error[1]
    with pytest.raises(carclf_flavor.InvalidInputError, match="row 1: not a recognised image format"):
        model.predict(bad_batch, params={"errors": "raise"})
    old_config = mlflow.pyfunc.load_model(str(model_dir), model_config={"errors": "raise"})
    with pytest.raises(carclf_flavor.InvalidInputError, match="row 1: not a recognised image format"):
        old_config.predict(bad_batch)
    monkeypatch.setenv("CARCLF_ERRORS", "raise")
    with pytest.raises(carclf_flavor.InvalidInputError, match="row 1: not a recognised image format"):
        mlflow.pyfunc.load_model(str(model_dir)).predict(bad_batch)

    # Inside azmlinfsrv its package is imported in the scoring process itself; AZUREML_MODEL_DIR alone (Azure ML
    # batch jobs set it too) is no sign.
    assert azure_inference_server(env={}, modules={"azureml_inference_server_http": sys}) == (
        "azureml_inference_server_http is loaded"
    )
    assert azure_inference_server(env={"AZUREML_MODEL_DIR": "/var/azureml-app/model"}, modules={}) is None


def test_server_still_answers_after_bad_input_and_concurrent_clients_agree(server):
    # Runs after the bad-input tests (file order): the server survived all of them.
    assert requests.get(f"{server['url']}/ping", timeout=5).status_code == 200
    bodies = [{**_split([b64(IMAGES[i % len(IMAGES)])]), "params": {"top_k": 3}} for i in range(len(IMAGES))]
    sequential = [invoke(server, body).json()["predictions"][0] for body in bodies]
    failures, answers = [], []
    lock = threading.Lock()

    def client(worker):
        session = requests.Session()
        for n in range(25):
            index = (worker + n) % len(bodies)
            try:
                response = session.post(
                    f"{server['url']}/invocations",
                    data=json.dumps(bodies[index]),
                    headers={"Content-Type": "application/json"},
                    timeout=120,
                )
                with lock:
                    if response.status_code != 200:
                        failures.append((worker, n, response.status_code, response.text[:200]))
                    else:
                        answers.append((index, response.json()["predictions"][0]))
            except Exception as exc:  # reported below
                with lock:
                    failures.append((worker, n, repr(exc)))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(answers) == 8 * 25
    for index, prediction in answers:
        assert prediction["label"] == sequential[index]["label"]
        assert prediction["prob"] == pytest.approx(sequential[index]["prob"], abs=1e-6)
    assert requests.get(f"{server['url']}/ping", timeout=5).status_code == 200


def test_score_client_table_json_bbox_and_errors(server, tmp_path, classifier):
    files = []
    for i, data in enumerate(IMAGES[:3]):
        files.append(tmp_path / f"car{i}.jpg")
        files[-1].write_bytes(data)
    base = [sys.executable, "-m", "entry_points.score", "--url", server["url"]]
    env = _subprocess_env(PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        base + [*map(str, files), "--top-k", "3", "--json", "--batch-size", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["file"] for r in results] == [str(f) for f in files]
    assert [r["label"] for r in results] == [p["label"] for p in classifier.predict(IMAGES[:3])]
    assert all(len(r["top_k"]) == 3 for r in results)

    table = subprocess.run(
        base + [str(files[0]), "--bbox", "5,5,60.0,50"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    expected = classifier.predict([IMAGES[0]], bboxes=[(5, 5, 60, 50)])[0]
    assert expected["label"] in table.stdout and f"{expected['prob']:.3f}" in table.stdout

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    refused = subprocess.run(
        base + [str(files[0]), str(bad)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: the server refused the request (HTTP 400): ")
    assert f"{bad}: not a recognised image format" in refused.stderr and "Traceback" not in refused.stderr

    down = subprocess.run(
        [sys.executable, "-m", "entry_points.score", "--url", f"http://127.0.0.1:{free_port()}", str(files[0])],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert down.returncode == 2 and "error: cannot connect to" in down.stderr and "Traceback" not in down.stderr


@pytest.mark.slow
def test_mlflow_models_predict_cli(model_dir, tmp_path, classifier):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({**_split([b64(IMAGES[2])], [b64(IMAGES[3])]), "params": {"top_k": 2}}))
    output = tmp_path / "predictions.json"
    mlflow_cli = pathlib.Path(sys.executable).with_name("mlflow")
    done = subprocess.run(
        [
            str(mlflow_cli),
            "models",
            "predict",
            "-m",
            str(model_dir),
            "-i",
            str(request),
            "-o",
            str(output),
            "-t",
            "json",
            "--env-manager",
            "local",
        ],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = json.loads(output.read_text())["predictions"]
    expected = classifier.predict([IMAGES[2], IMAGES[3]], top_k=2)
    assert [p["label"] for p in predictions] == [e["label"] for e in expected]
    assert all(len(top_k_entries(p["top_k"])) == 2 for p in predictions)


@pytest.mark.slow
def test_spark_udf_batch_scoring(model_dir, tmp_path, classifier):
    from carclf.scoring.spark_batch import score_folder_spark

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, data in enumerate(IMAGES[:3]):
        (folder / ("sub" if i == 2 else "") / f"car{i}.jpg").write_bytes(data)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image, skipped by suffix")
    output = tmp_path / "scores.parquet"
    count = score_folder_spark(str(model_dir), folder, output, top_k=2)
    assert count == 4
    import pandas as pd

    frame = pd.read_parquet(output).sort_values("path").reset_index(drop=True)
    by_name = {pathlib.Path(p.replace("file:", "")).name: row for p, row in zip(frame.path, frame.itertuples())}
    assert "not a recognised image format" in by_name["broken.png"].error
    assert pd.isna(by_name["broken.png"].class_id) and pd.isna(by_name["broken.png"].prob)
    expected = classifier.predict(IMAGES[:3], top_k=2)
    for i in range(3):
        row = by_name[f"car{i}.jpg"]
        assert row.error is None
        assert row.label == expected[i]["label"] and int(row.class_id) == expected[i]["class_id"]
        assert row.prob == pytest.approx(expected[i]["prob"], abs=1e-5)
        assert [t["label"] for t in top_k_entries(row.top_k)] == [t["label"] for t in expected[i]["top_k"]]
    assert not any(p.name.startswith(".scores.parquet.partial") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_model_loads_and_predicts_in_a_fresh_virtualenv(model_dir, tmp_path, classifier):
    """Only the model's requirements.txt installed; the repo is neither installed nor on sys.path."""
    python, clean_env = fresh_venv_python(tmp_path, model_dir / "requirements.txt")
    (tmp_path / "car.jpg").write_bytes(IMAGES[4])
    script = tmp_path / "check.py"
    script.write_text(
        "import json, sys\n"
        "import pandas as pd, mlflow.pyfunc\n"
        "import importlib.util\n"
        f"assert {str(REPO_ROOT)!r} not in sys.path and importlib.util.find_spec('carclf_flavor') is None\n"
        f"model = mlflow.pyfunc.load_model({str(model_dir)!r})\n"
        "frame = model.predict(pd.DataFrame({'image': [open('car.jpg', 'rb').read()]}), params={'top_k': 2})\n"
        "import carclf_flavor, carclf_flavor.pyfunc\n"
        "decoder = carclf_flavor.pyfunc._strict_b64decode.__module__\n"
        "print(json.dumps({'label': frame.label[0], 'prob': float(frame.prob[0]), 'module': carclf_flavor.__file__,\n"
        "                  'base64': decoder}))\n"
    )
    run = subprocess.run(
        [str(python), str(script)], capture_output=True, text=True, env=clean_env, cwd=tmp_path, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    expected = classifier.predict(IMAGES[4])[0]
    assert result["label"] == expected["label"]
    assert result["prob"] == pytest.approx(expected["prob"], abs=1e-5)
    # The code that ran is the copy inside the model, not the repository.
    assert result["module"].startswith(str(model_dir / "code"))
    # The model's requirements bring the SIMD base64 decoder its requests are decoded with.
    assert result["base64"].startswith("pybase64") and "pybase64" in (model_dir / "requirements.txt").read_text()
