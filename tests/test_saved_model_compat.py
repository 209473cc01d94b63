"""Saved models across code versions: a model saved by the carclf_flavor of an earlier commit loads and predicts
identically with this one, and a model saved by this one loads in a fresh process from its own shipped code.

The earlier packages are committed as source archives (``tests/fixtures/carclf_flavor-*.tar.gz``, made with
``git archive COMMIT carclf_flavor``), so the test needs no git history and runs in a shallow clone.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

import carclf_flavor
from carclf_flavor.images import PreprocessSettings
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes

# Earlier versions of the package whose saved models must keep loading: the last one with the whole flavor in
# __init__.py (commit 0936327), and 0.3.0, the last one before the flavor's public face was cut down.
EARLIER_VERSIONS = ["pre-split", "0.3.0"]
TESTS_DIR = pathlib.Path(__file__).resolve().parent
FIXTURES = TESTS_DIR / "fixtures"
IMAGES = [jpeg_bytes(80, 60, seed=seed) for seed in range(4)]
BBOXES = [None, (5, 4, 70, 55), None, (0, 0, 40, 30)]
BAD_ROW = "dGhpcyBpcyBub3Q="  # base64 of "this is not": decodes, but to no image format

# Run by every version of the package alike (it uses only the public API), printing one JSON line.
PREDICT_SCRIPT = """
import base64, json, sys
import mlflow.pyfunc, pandas as pd
import carclf_flavor

model_path, images_json = sys.argv[1], sys.argv[2]
images = [base64.b64decode(text) for text in json.loads(images_json)["images"]]
bboxes = json.loads(images_json)["bboxes"]
bboxes = [tuple(box) if box else None for box in bboxes]
classifier = carclf_flavor.load_model(model_path)
pyfunc = mlflow.pyfunc.load_model(model_path)
frame = pd.DataFrame({"image": [base64.b64encode(image).decode("ascii") for image in images] + [sys.argv[3]],
                      "bbox_x1": [b[0] if b else None for b in bboxes] + [None],
                      "bbox_y1": [b[1] if b else None for b in bboxes] + [None],
                      "bbox_x2": [b[2] if b else None for b in bboxes] + [None],
                      "bbox_y2": [b[3] if b else None for b in bboxes] + [None]})
coerced = pyfunc.predict(frame, params={"top_k": 3, "errors": "coerce"})
try:
    pyfunc.predict(pd.concat([frame, frame.tail(1)], ignore_index=True), params={"top_k": 3})
    raised = None
except Exception as error:
    raised = f"{type(error).__name__}: {getattr(error, 'message', error)}"
print(json.dumps({
    "module": carclf_flavor.__file__,
    "predict": classifier.predict(images, top_k=3, bboxes=bboxes),
    "pyfunc": json.loads(coerced.to_json(orient="records")),
    "raised": raised,
    "loaded_from": sorted(m.__file__ for name, m in sys.modules.items() if name.split(".")[0] == "carclf_flavor"),
}))
"""


def _payload() -> str:
    return json.dumps(
        {
            "images": [base64.b64encode(image).decode("ascii") for image in IMAGES],
            "bboxes": [list(box) if box else None for box in BBOXES],
        }
    )


def _env(pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, MLFLOW_DISABLE_TELEMETRY="true", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("CARCLF_INFERENCE_PRECISION", None)
    return env


def _run_json(args, env, cwd) -> dict:
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _earlier_package(version: str, destination: pathlib.Path) -> pathlib.Path:
    """carclf_flavor as it was in ``version``, extracted under ``destination``."""
    with tarfile.open(FIXTURES / f"carclf_flavor-{version}.tar.gz") as tar:
        tar.extractall(destination, filter="data")
    assert (destination / "carclf_flavor" / "__init__.py").is_file()
    return destination


def _assert_same_answers(new: dict, old: dict):
    assert len(new["predict"]) == len(old["predict"]) == len(IMAGES)
    for mine, theirs in zip(new["predict"], old["predict"]):
        assert (mine["label"], mine["class_id"]) == (theirs["label"], theirs["class_id"])
        assert [entry["label"] for entry in mine["top_k"]] == [entry["label"] for entry in theirs["top_k"]]
        np.testing.assert_allclose(
            [e["prob"] for e in mine["top_k"]], [e["prob"] for e in theirs["top_k"]], rtol=0, atol=1e-6
        )
    assert [row["label"] for row in new["pyfunc"]] == [row["label"] for row in old["pyfunc"]]
    # The same rows are bad; why a photo is unreadable is images.py's wording, which may improve between versions.
    assert [row["error"] is None for row in new["pyfunc"]] == [row["error"] is None for row in old["pyfunc"]]
    assert old["pyfunc"][-1]["error"] and old["pyfunc"][-1]["label"] is None  # the bad row is really bad
    np.testing.assert_allclose(
        [row["prob"] or 0.0 for row in new["pyfunc"]], [row["prob"] or 0.0 for row in old["pyfunc"]], rtol=0, atol=1e-6
    )
    # The flavor's own wording of a failed request is unchanged: first bad row, and how many more.
    for raised in (new["raised"], old["raised"]):
        assert raised.startswith("InvalidInputError: row 4: not a recognised image format"), raised
        assert raised.endswith(" (and 1 more bad rows; params errors=coerce scores the good ones)"), raised


def _answers_in_process(model_path: pathlib.Path) -> dict:
    """PREDICT_SCRIPT's answers, computed by the carclf_flavor imported in this process."""
    classifier = carclf_flavor.load_model(str(model_path))
    pyfunc = mlflow.pyfunc.load_model(str(model_path))
    assert type(classifier).__module__ == "carclf_flavor.classifier"
    assert type(pyfunc.get_raw_model()).__module__ == "carclf_flavor.classifier"
    assert type(pyfunc._model_impl).__module__ == "carclf_flavor.pyfunc"
    images = [base64.b64encode(image).decode("ascii") for image in IMAGES] + [BAD_ROW]
    frame = pd.DataFrame(
        {
            "image": images,
            **{
                column: [box[i] if box else None for box in BBOXES] + [None]
                for i, column in enumerate(carclf_flavor.BBOX_COLUMNS)
            },
        }
    )
    coerced = pyfunc.predict(frame, params={"top_k": 3, "errors": "coerce"})
    with pytest.raises(carclf_flavor.InvalidInputError) as raised:
        pyfunc.predict(pd.concat([frame, frame.tail(1)], ignore_index=True), params={"top_k": 3})
    return {
        "predict": json.loads(json.dumps(classifier.predict(IMAGES, top_k=3, bboxes=BBOXES))),
        "pyfunc": json.loads(coerced.to_json(orient="records")),
        "raised": f"{type(raised.value).__name__}: {raised.value.message}",
    }


@pytest.mark.parametrize("version", EARLIER_VERSIONS)
def test_model_saved_by_an_earlier_version_loads_and_predicts_identically(version, tmp_path, monkeypatch):
    old_root = _earlier_package(version, tmp_path / "old")
    model_path = tmp_path / "old-model"
    save = (
        "import sys, carclf_flavor\n"
        f"assert carclf_flavor.__file__.startswith({str(old_root)!r}), carclf_flavor.__file__\n"
        "from carclf_flavor.images import PreprocessSettings\n"
        "from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet\n"
        f"carclf_flavor.save_model(build_tiny_resnet(seed=7), {str(model_path)!r}, CLASS_NAMES,\n"
        "                         preprocessing=PreprocessSettings(image_size=IMAGE_SIZE), inference_precision='float32',\n"
        # The old code pins `tensorflow-cpu` by its installed version, and this environment may have `tensorflow`
        # instead (the package now depends on it): the requirements are given, the rest is the old code's own.
        "                         pip_requirements=['mlflow', 'tensorflow', 'keras'])\n"
        "print('{}')\n"
    )
    old_env = _env(os.pathsep.join([str(old_root), str(TESTS_DIR)]))
    _run_json(["-c", save], old_env, tmp_path)
    # What the old code itself answers for its model (its own shipped copy is first on the path when loading).
    old = _run_json(["-c", PREDICT_SCRIPT, str(model_path), _payload(), BAD_ROW], old_env, tmp_path)
    assert old["module"].startswith(str(old_root))
    mlmodel = (model_path / "MLmodel").read_text()
    assert "loader_module: carclf_flavor" in mlmodel
    shipped = sorted(p.name for p in (model_path / "code" / "carclf_flavor").glob("*.py"))
    assert shipped == sorted(p.name for p in (old_root / "carclf_flavor").glob("*.py"))  # really the old code

    # The new code, in this process: loading prepends the model's (old) code dir to sys.path, but the package
    # imported here is the one that runs.
    monkeypatch.setattr(sys, "path", list(sys.path))
    new = _answers_in_process(model_path)
    _assert_same_answers(new, old)


def test_model_saved_now_loads_from_its_own_code_in_a_fresh_process(tmp_path):
    """Only the model's code/ folder on the path: every module of the new layout ships and is the one used."""
    model_path = tmp_path / "model"
    carclf_flavor.save_model(
        build_tiny_resnet(seed=7),
        model_path,
        CLASS_NAMES,
        preprocessing=PreprocessSettings(image_size=IMAGE_SIZE),
        inference_precision="float32",
    )
    code_dir = model_path / "code"
    package = pathlib.Path(carclf_flavor.__file__).parent
    assert {p.name for p in (code_dir / "carclf_flavor").glob("*.py")} == {p.name for p in package.glob("*.py")}

    fresh = _run_json(["-c", PREDICT_SCRIPT, str(model_path), _payload(), BAD_ROW], _env(str(code_dir)), tmp_path)
    assert fresh["module"].startswith(str(code_dir)), fresh["module"]
    assert fresh["loaded_from"] and all(path.startswith(str(code_dir)) for path in fresh["loaded_from"])
    _assert_same_answers(_answers_in_process(model_path), fresh)


def test_shipped_package_imports_neither_spark_nor_the_pipeline():
    """code/carclf_flavor is all a served model has: an import of pyspark or entry_points would fail there."""
    import ast

    package = pathlib.Path(carclf_flavor.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in ("pyspark", "entry_points")]
    assert len(list(package.glob("*.py"))) >= 10 and not offenders, offenders
