"""Azure ML batch endpoints: the scoring script run locally the way Azure runs it, and `deploy kind=batch` /
`score --azure-batch-endpoint` against Azure's REST API without ever reaching Azure (see test_deploy.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

import carclf_flavor
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.signature import top_k_entries
from conftest import REPO_ROOT
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes

SCORE_SCRIPT = REPO_ROOT / "carclf" / "deployment" / "azure_batch_code" / "score.py"

# Azure imports the code folder's script by path and calls init() once, then run(mini_batch) with file paths.
RUN_LIKE_AZURE = textwrap.dedent(
    """
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("batch_driver", sys.argv[1])
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.init()
    lines = script.run(json.loads(sys.argv[2]))
    imported = sorted(m for m in sys.modules if m == "carclf" or m.startswith("carclf."))
    print("BATCH " + json.dumps({"lines": lines, "carclf_modules": imported}))
    """
)


@pytest.fixture(scope="module")
def batch_model(tmp_path_factory):
    """A saved tiny carclf model laid out as Azure mounts a registered MLflow model: <model dir>/<folder>/MLmodel."""
    root = tmp_path_factory.mktemp("azureml-model-dir")
    carclf_flavor.save_model(
        build_tiny_resnet(seed=5),
        root / "model",
        CLASS_NAMES,
        preprocessing=PreprocessSettings(image_size=IMAGE_SIZE, crop="none"),
        inference_precision="float32",
    )
    return root


def _photo_folder(folder):
    folder.mkdir()
    good = {f"car_{i}.jpg": jpeg_bytes(64 + 8 * i, 48 + 4 * i, seed=70 + i) for i in range(3)}
    for name, data in good.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not a photo\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(good["car_0.jpg"][:200])
    order = ["car_0.jpg", "notes.txt", "car_1.jpg", "empty.jpg", "cut.jpg", "gone.jpg", "car_2.jpg"]
    return good, [str(folder / name) for name in order]


def test_batch_script_scores_a_folder_with_bad_files_among_good_ones(batch_model, tmp_path):
    good, paths = _photo_folder(tmp_path / "photos")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CARCLF_ERRORS")}
    # Azure batch jobs set AZUREML_MODEL_DIR, which is no sign of the online server: the script says coerce itself.
    env.update(AZUREML_MODEL_DIR=str(batch_model), MLFLOW_DISABLE_TELEMETRY="true", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", RUN_LIKE_AZURE, str(SCORE_SCRIPT), json.dumps(paths)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("BATCH ")), None)
    assert line, f"rc={result.returncode}\n{result.stderr[-4000:]}"
    answer = json.loads(line[len("BATCH ") :])
    assert answer["carclf_modules"] == [], "the script must run with only the model's requirements installed"
    # One CSV line per file, in order: a plain CSV once Azure appends them (labels have spaces, top_k is JSON).
    rows = [dict(zip(("file", "label", "class_id", "prob", "top_k", "error"), r)) for r in csv.reader(answer["lines"])]
    assert [r["file"] for r in rows] == [os.path.basename(p) for p in paths]
    by_file = {r["file"]: r for r in rows}
    for bad in ("notes.txt", "empty.jpg", "cut.jpg", "gone.jpg"):
        assert by_file[bad]["error"] and by_file[bad]["label"] == "", by_file[bad]
    assert "gone.jpg" in by_file["gone.jpg"]["error"] and "cannot read" in by_file["gone.jpg"]["error"]
    # The good photos answer exactly what the model answers in-process.
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(str(batch_model / "model"))
    names = sorted(good)
    expected = model.predict(pd.DataFrame({"image": [good[n] for n in names]})).to_dict(orient="records")
    for name, want in zip(names, expected, strict=True):
        got = by_file[name]
        assert got["error"] == "" and got["label"] == want["label"], (got, want)
        assert int(got["class_id"]) == int(want["class_id"])
        assert float(got["prob"]) == pytest.approx(float(want["prob"]), abs=1e-6)
        assert [e["label"] for e in top_k_entries(got["top_k"])] == [e["label"] for e in top_k_entries(want["top_k"])]


def test_batch_script_refuses_a_model_dir_without_one_model(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("batch_driver_check", SCORE_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    with pytest.raises(RuntimeError, match="AZUREML_MODEL_DIR is not set"):
        script.init()
    with pytest.raises(RuntimeError, match="expected one MLflow model .* found 0"):
        script.find_model_dir(tmp_path)
    with pytest.raises(RuntimeError, match="init\\(\\) was not called"):
        script.run([str(tmp_path / "x.jpg")])
