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
from helpers_deploy import clean_azure_env, offline_run
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes
from test_deploy import SP, SUB, TARGET

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


# ------------------------------------------------------------------------------------------ deploy, offline

BATCH_SCRIPT = textwrap.dedent(
    """
    # A CLI against a fake Azure ML answering the real requests (helpers_deploy.FakeAzureML), state carried over.
    import json, sys
    from helpers_deploy import FakeAzureML

    spec = json.loads(sys.argv[1])
    fake = FakeAzureML(spec["sub"], "rg-cars", "ws-cars")
    fake.computes = set(spec["computes"])
    for attr in ("assets", "blobs_seen", "batch_endpoints"):
        if attr in spec.get("state", {}):
            setattr(fake, attr, spec["state"][attr])
    fake.batch_deployments = {tuple(k.split("/")): v for k, v in spec.get("state", {}).get("deployments", {}).items()}
    fake.install()
    module = __import__(spec["module"], fromlist=["main"])
    rc = module.main(spec["argv"])
    print("FAKE " + json.dumps({"rc": rc, "calls": fake.calls, "assets": fake.assets, "jobs": fake.jobs,
                                "blobs": {k: v.decode() for k, v in fake.blobs.items()},
                                "batch_endpoints": fake.batch_endpoints,
                                "deployments": {"/".join(k): v for k, v in fake.batch_deployments.items()}}))
    """
)


def _against_fake(tmp_path, module, argv, computes=("cpu-cluster",), state=None, creds=True):
    script = tmp_path / "batch_fake.py"
    script.write_text(BATCH_SCRIPT)
    env = clean_azure_env(tmp_path)
    if creds:
        env.update(SP)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    spec = {"sub": SUB, "computes": list(computes), "state": state or {}, "module": module, "argv": argv}
    result = offline_run([sys.executable, str(script), json.dumps(spec)], env=env, timeout=180, cwd=tmp_path)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("FAKE ")), None)
    assert line, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    state = json.loads(line[len("FAKE ") :])
    state["stderr"] = result.stderr
    state["result"] = json.loads(result.stdout[: result.stdout.index("FAKE ")]) if state["rc"] == 0 else None
    return state


def _deploy_batch(tmp_path, *args, **kwargs):
    argv = ["--target", TARGET, "--name", "car-batch", "--kind", "batch", "--network-check", "false"]
    return _against_fake(
        tmp_path, "entry_points.deploy", [*argv, "--config-dir", str(tmp_path / "cfg"), *args], **kwargs
    )


def _writes(state, suffix):
    return [c for c in state["calls"] if c["method"] in ("PUT", "PATCH") and c["path"].endswith(suffix)]


def test_batch_deploy_creates_endpoint_and_deployment_then_updates_them_in_place(tmp_path):
    from helpers_deploy import register_version_model

    register_version_model(tmp_path, "carclf", "one", labelled=True)
    model = register_version_model(tmp_path, "carclf", "two", labelled=True)
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias("carclf", "champion", "2")
    state = _deploy_batch(tmp_path, "--model-uri", "models:/carclf@champion", "--mini-batch-size", "20")
    assert state["rc"] == 0, state["stderr"][-3000:]
    result = state["result"]
    assert result["model_uri"] == model and result["action"] == "created endpoint" and result["kind"] == "batch"
    assert result["scoring_uri"] == "https://car-batch.westeurope.inference.ml.azure.com/jobs"
    # The scoring script went to the workspace's blob store unchanged and was registered as code.
    ((blob, uploaded),) = state["blobs"].items()
    assert blob.startswith("stcars/azureml-blobstore/LocalUpload/carclf-batch-score/") and blob.endswith("/score.py")
    assert uploaded == SCORE_SCRIPT.read_text()
    (endpoint,) = _writes(state, "/batchEndpoints/car-batch")[:1]
    assert endpoint["method"] == "PUT" and endpoint["body"]["properties"]["authMode"] == "AADToken"
    (deployment,) = _writes(state, "/batchEndpoints/car-batch/deployments/carclf")
    props = deployment["body"]["properties"]
    assert props["model"]["assetId"].endswith("/models/carclf/versions/2")  # the alias, resolved
    assert props["codeConfiguration"]["scoringScript"] == "score.py"
    assert props["compute"].endswith("/computes/cpu-cluster") and props["miniBatchSize"] == 20
    assert props["outputAction"] == "AppendRow" and props["outputFileName"] == "predictions.csv"
    assert props["errorThreshold"] == -1 and props["resources"]["instanceCount"] == 1
    (environment,) = [v for k, v in state["assets"].items() if k.startswith("environments/carclf-batch/")]
    conda = environment["properties"]["condaFile"]
    assert "azureml-core" in conda and "mlflow" in conda  # the model's requirements + Azure's batch runtime
    assert state["batch_endpoints"]["car-batch"]["properties"]["defaults"] == {"deploymentName": "carclf"}
    assert json.loads((tmp_path / "cfg" / "batch.json").read_text())["mini_batch_size"] == 20

    # Again with the same model: the same deployment is updated; code and endpoint are reused, not duplicated.
    again = _deploy_batch(
        tmp_path,
        "--model-uri",
        model,
        state={
            "assets": state["assets"],
            "batch_endpoints": state["batch_endpoints"],
            "deployments": state["deployments"],
        },
    )
    assert again["rc"] == 0, again["stderr"][-3000:]
    assert again["result"]["action"] == "updated"
    assert not again["blobs"] and not [c for c in _writes(again, "/batchEndpoints/car-batch") if c["method"] == "PUT"]
    assert len(_writes(again, "/deployments/carclf")) == 1 and not _writes(again, "/codes/")


def test_batch_deploy_names_a_missing_compute_cluster_before_writing_anything(tmp_path):
    from helpers_deploy import register_version_model

    model = register_version_model(tmp_path, "carclf", "one", labelled=True)
    state = _deploy_batch(tmp_path, "--model-uri", model, "--compute-cluster", "gpu-nodes", computes=())
    assert state["rc"] == 2
    errors = [ln for ln in state["stderr"].splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in state["stderr"], state["stderr"][-3000:]
    assert "compute cluster 'gpu-nodes' does not exist" in errors[0] and "az ml compute create" in errors[0]
    assert not [c for c in state["calls"] if c["method"] in ("PUT", "PATCH")] and not state["blobs"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--kind", "stream"), "--kind: invalid choice"),
        (("--kind", "batch", "--mini-batch-size", "0"), "mini_batch_size must be a whole number >= 1"),
        (("--kind", "batch", "--compute-cluster", "x"), "compute_cluster 'x'"),
        (("--kind", "batch", "--output-file-name", "../out.csv"), "output_file_name '../out.csv'"),
        (("--kind", "batch", "--model-uri", "models:/carclf/Production"), "names a stage"),
        (("--kind", "batch", "--target", "carclf-local"), "kind=batch is an Azure ML batch endpoint"),
        (
            (
                "--kind",
                "batch",
            ),
            "no Azure credentials found",
        ),
    ],
)
def test_batch_preflight_errors_are_one_line_before_anything_is_sent(tmp_path, mlflow_store, args, expected):
    env = clean_azure_env(tmp_path)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["MLFLOW_TRACKING_URI"] = mlflow_store
    base = ["--model-uri", "models:/carclf/1", "--target", TARGET, "--name", "car-batch"]
    command = [sys.executable, "-m", "entry_points.deploy", *base, "--config-dir", str(tmp_path / "cfg"), *args]
    result = offline_run(command, env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert expected in errors[0], errors[0]
    assert not (tmp_path / "cfg").exists()


def test_batch_deploy_without_network_ends_with_one_line_not_a_hang(tmp_path, mlflow_store):
    """Past the preflight, the real plugin client and Azure SDK requests find no network: one line, quickly."""

    env = clean_azure_env(tmp_path)
    env.update(SP, PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=mlflow_store)
    command = [sys.executable, "-m", "entry_points.deploy", "--model-uri", "models:/carclf/1", "--target", TARGET]
    command += [
        "--name",
        "car-batch",
        "--kind",
        "batch",
        "--network-check",
        "false",
        "--config-dir",
        str(tmp_path / "cfg"),
    ]
    result = offline_run(command, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "compute cluster 'cpu-cluster'" in errors[0] and "login.microsoftonline.com" in errors[0], errors[0]


# ------------------------------------------------------------------------------------------ starting a job
JOBS_URL = "https://car-batch.westeurope.inference.ml.azure.com/jobs"
PHOTOS = "azureml://datastores/workspaceblobstore/paths/photos/"


def test_score_starts_a_batch_job_with_an_entra_token_and_a_folder_input(tmp_path):
    endpoint = {"car-batch": {"name": "car-batch", "properties": {"scoringUri": JOBS_URL}}}
    state = _against_fake(
        tmp_path,
        "entry_points.score",
        ["--azure-batch-endpoint", JOBS_URL, "--input", PHOTOS],
        state={"batch_endpoints": endpoint},
    )
    assert state["rc"] == 0, state["stderr"][-3000:]
    (job,) = state["jobs"]
    assert job["body"] == {"properties": {"InputData": {"photos": {"JobInputType": "UriFolder", "Uri": PHOTOS}}}}
    assert (
        state["result"]["job"] == "batchjob-0001" and "az ml job download -n batchjob-0001" in state["result"]["output"]
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--azure-batch-endpoint", "http://x/jobs", "--input", PHOTOS), "is not a batch endpoint's invocation URI"),
        (("--azure-batch-endpoint", JOBS_URL, "--input", "photos/"), "--input 'photos/'"),
        (("--azure-batch-endpoint", JOBS_URL), "needs --input"),
        (("--input", PHOTOS), "--input is for --azure-batch-endpoint"),
        (("--azure-batch-endpoint", JOBS_URL, "--input", PHOTOS, "a.jpg"), "give no local files"),
        (("--azure-batch-endpoint", JOBS_URL, "--input", PHOTOS), "no Azure credentials found"),
    ],
)
def test_score_batch_job_errors_are_one_line(tmp_path, args, expected):
    env = clean_azure_env(tmp_path)
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = offline_run([sys.executable, "-m", "entry_points.score", *args], env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert expected in line, line


def test_score_batch_job_without_network_ends_with_one_line(tmp_path):
    env = clean_azure_env(tmp_path)
    env.update(SP, PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "entry_points.score", "--azure-batch-endpoint", JOBS_URL, "--input", PHOTOS]
    result = offline_run(command, env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "starting a batch job" in line and "ClientAuthenticationError" in line, line
