"""Every Spark step on Spark Connect: PySpark's own Connect server (from its wheel) on 127.0.0.1, one for the
session, and each step's CLI against it, compared with the same step on a classic ``local[2]``.

PySpark cannot hold a classic and a Connect session in one process (the Connect client switches the whole
process's DataFrame functions to Connect), and this pytest process runs classic sessions for the other
modules: every Connect client here is a step's CLI in a process of its own. Relative paths are given on
purpose: the server's Python workers run in the server's working directory, not the step's.
"""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

import carclf_flavor
from carclf.compute.ports import free_port
from carclf_flavor.images import PreprocessSettings
from conftest import REPO_ROOT
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes
from test_augment import ALL_OPS, source  # noqa: F401 - `source` is a fixture used here
from test_distributed import _mw_cli, _worker_processes, mw_splits  # noqa: F401 - `mw_splits` is a fixture
from test_tune import SPACE_YAML, _colour_set

SERVER_START_TIMEOUT_S = 180
STEP_TIMEOUT_S = 600


def _server_env(folder: pathlib.Path, spark_home: pathlib.Path) -> dict:
    return dict(
        os.environ,
        SPARK_HOME=str(spark_home),
        SPARK_LOG_DIR=str(folder / "logs"),
        SPARK_PID_DIR=str(folder / "pids"),
        SPARK_IDENT_STRING="carclf-test",
        SPARK_LOCAL_IP="127.0.0.1",
        # The server's Python workers: this interpreter, importing this checkout.
        PYSPARK_PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
        NO_PROXY="127.0.0.1,localhost",
    )


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return pathlib.Path(f"/proc/{pid}").exists() and "zombie" not in pathlib.Path(f"/proc/{pid}/status").read_text()


@pytest.fixture(scope="session")
def connect_server(tmp_path_factory):
    """``sc://127.0.0.1:PORT``: sbin/start-connect-server.sh of the installed PySpark on a local[2] master."""
    import pyspark

    spark_home = pathlib.Path(pyspark.__file__).parent
    folder = tmp_path_factory.mktemp("connect-server")
    env = _server_env(folder, spark_home)
    port = free_port()
    started = subprocess.run(
        [
            str(spark_home / "sbin" / "start-connect-server.sh"),
            "--master",
            "local[2]",
            "--conf",
            "spark.connect.grpc.binding.address=127.0.0.1",
            "--conf",
            f"spark.connect.grpc.binding.port={port}",
            "--conf",
            "spark.driver.host=127.0.0.1",
            "--conf",
            "spark.driver.bindAddress=127.0.0.1",
            "--conf",
            "spark.ui.enabled=false",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    (pid_file,) = (folder / "pids").glob("*.pid")
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not _accepts(port):
        logs = "\n".join(p.read_text()[-3000:] for p in (folder / "logs").glob("*"))
        assert _alive(pid), f"the Connect server exited:\n{logs}"
        assert time.monotonic() < deadline, f"the Connect server did not listen within {SERVER_START_TIMEOUT_S} s"
        time.sleep(0.2)
    try:
        yield f"sc://127.0.0.1:{port}"
    finally:
        subprocess.run([str(spark_home / "sbin" / "stop-connect-server.sh")], env=env, capture_output=True, timeout=120)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):  # the script gave up: no JVM may outlive the session
            os.kill(pid, signal.SIGKILL)
        assert not _alive(pid)


def _step(module: str, args, cwd, **env):
    """A step's CLI (``python -m entry_points.<module>``) in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", f"entry_points.{module}", *map(str, args)],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), NO_PROXY="127.0.0.1,localhost", **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
    )


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


# --------------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------------
def test_missing_connect_client_package_is_one_line_naming_the_install(connect_server, source, tmp_path):  # noqa: F811
    import pyspark

    script = (
        "import sys; sys.modules['zstandard'] = None\n"  # import zstandard now raises ImportError
        "from entry_points.augment import main\n"
        f"sys.exit(main(['--input', {str(source)!r}, '--output', 'out.h5', '--spark-master', {connect_server!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = _one_error_line(done.stderr)
    assert f"Spark Connect ({connect_server}) needs zstandard" in line, line
    assert f"pip install 'pyspark[connect]=={pyspark.__version__}'" in line
    assert not (tmp_path / "out.h5").exists()


SESSIONS_SCRIPT = """
import json, sys
from carclf.compute.spark_session import SparkSetupError, get_spark, session_master, ship_project_code
url = sys.argv[1]
out = {}
classic = get_spark("local[1]")
try:
    get_spark(url)
except SparkSetupError as exc:
    out["connect_beside_classic"] = str(exc)
classic.stop()
remote = get_spark(url)
out["connect_master"] = session_master(remote)
try:
    get_spark("local[2]")
except SparkSetupError as exc:
    out["classic_beside_connect"] = str(exc)
out["default_reuses_connect"] = get_spark("local[*]") is remote
out["same_url_reuses"] = get_spark(url + "/;user_id=carclf") is remote
# The project reached the server's Python workers as an artifact of this session: a task imports from it.
def where(batches):
    import pandas as pd
    import carclf.compute.spark_session as module
    for _ in batches:
        yield pd.DataFrame({"file": [module.__file__]})
out["task_imports_from"] = remote.range(1).mapInPandas(where, "file string").collect()[0].file
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_process_gets_sessions_of_the_kind_it_asks_for(connect_server, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SESSIONS_SCRIPT, connect_server],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), CARCLF_SPARK_LOG_DIR=str(tmp_path)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["connect_beside_classic"] == (
        f"cannot open Spark Connect on {connect_server}: this process already runs a classic Spark session "
        "(local[1]) and PySpark cannot hold both; run the step in a process of its own"
    )
    assert out["connect_master"] == connect_server  # the URL given, not the server's own local[2]
    assert out["classic_beside_connect"].startswith("cannot start Spark on local[2]: this process holds a Spark ")
    assert f"pass spark_master={connect_server}" in out["classic_beside_connect"]
    assert out["default_reuses_connect"] and out["same_url_reuses"]
    # Not this checkout (the server's PYTHONPATH has it too): the zip that addArtifacts sent.
    assert "carclf_code.zip" in out["task_imports_from"], out["task_imports_from"]


# --------------------------------------------------------------------------------------------------
# augment
# --------------------------------------------------------------------------------------------------
def _everything(path) -> dict:
    """Every dataset's values and every attribute (file's and datasets') of an HDF5 file."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = dict(f.attrs)

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj[()], obj.dtype, dict(obj.attrs))

        f.visititems(visit)
    return out


@pytest.mark.slow
def test_augment_on_connect_is_bit_identical_to_local(connect_server, source, tmp_path):  # noqa: F811
    from entry_points.augment import augment

    common = ["--copies", "2", "--ops", ALL_OPS, "--seed", "11", "--partitions", "3"]
    done = _step(
        "augment",
        ["--input", source.name, "--output", tmp_path / "connect.h5", *common, "--spark-master", connect_server],
        cwd=source.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Connect's own progress reports reach the console (a classic session's status tracker does not exist).
    assert "augment: 3/3 Spark tasks done" in done.stderr
    augment(
        input=source,
        output=tmp_path / "local.h5",
        copies=2,
        ops=ALL_OPS,
        seed=11,
        partitions=3,
        spark_master="local[2]",
        log_to_mlflow=False,
    )
    connect, local = _everything(tmp_path / "connect.h5"), _everything(tmp_path / "local.h5")
    assert connect.keys() == local.keys() and {"images", "labels", "source_index"} <= connect.keys()
    engine_connect, engine_local = connect["/"].pop("augment_engine"), local["/"].pop("augment_engine")
    assert engine_connect == f"spark {connect_server}" and engine_local.startswith("spark local[")
    for name in connect:
        if name == "/":
            assert connect[name].keys() == local[name].keys()
            for key in connect[name]:
                np.testing.assert_array_equal(connect[name][key], local[name][key], err_msg=key)
            continue
        values, dtype, attrs = connect[name]
        assert dtype == local[name][1] and attrs.keys() == local[name][2].keys(), name
        np.testing.assert_array_equal(values, local[name][0], err_msg=name)
    (run,) = MlflowClient().search_runs(["0"])
    assert run.data.params["spark_master"] == connect_server


# --------------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_score_on_connect_matches_local(connect_server, tmp_path):
    from carclf.scoring.spark_batch import score_folder_spark

    model = tmp_path / "model"
    carclf_flavor.save_model(
        build_tiny_resnet(seed=3),
        model,
        CLASS_NAMES,
        preprocessing=PreprocessSettings(image_size=IMAGE_SIZE, crop="bbox", crop_margin=4),
        inference_precision="float32",
    )
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i in range(4):
        (photos / ("sub" if i == 3 else "") / f"car{i}.jpg").write_bytes(jpeg_bytes(90 + 9 * i, 70 + 5 * i, seed=i))
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    done = _step(
        "score",
        ["--spark", "--model-uri", model, "--input-dir", "photos", "--output", "connect.parquet", "--top-k", "2"]
        + ["--spark-master", connect_server],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scored 5 images" in done.stdout
    assert score_folder_spark(str(model), photos, tmp_path / "local.parquet", top_k=2, spark_master="local[2]") == 5

    def frame(path):
        return pd.read_parquet(path).sort_values("path").reset_index(drop=True)

    connect, local = frame(tmp_path / "connect.parquet"), frame(tmp_path / "local.parquet")
    assert list(connect.columns) == list(local.columns) == ["path", "label", "class_id", "prob", "top_k", "error"]
    pd.testing.assert_frame_equal(connect.drop(columns="top_k"), local.drop(columns="top_k"))
    assert [None if t is None else [(e["label"], e["prob"]) for e in t] for t in connect.top_k] == [
        None if t is None else [(e["label"], e["prob"]) for e in t] for t in local.top_k
    ]
    assert connect.error.notna().sum() == 1 and connect.label.notna().sum() == 4


# --------------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tune_on_connect_with_relative_paths_and_a_failed_trials_reason(connect_server, tmp_path):
    for name, per_class, seed in (("train", 12, 0), ("val", 4, 1), ("test", 4, 2)):
        _colour_set(tmp_path / f"{name}.h5", per_class, seed)
    (tmp_path / "space.yaml").write_text(SPACE_YAML)
    args = ["--train-data", "train.h5", "--val-data", "val.h5", "--test-data", "test.h5", "--space", "space.yaml"]
    args += ["--trials", "2", "--parallel", "2", "--study-name", "colours", "--spark-master", connect_server]
    done = _step("tune", args, cwd=tmp_path, CARCLF_TEST_FAIL_TRIAL="1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 complete, 0 pruned, 1 failed" in done.stdout

    client = MlflowClient()
    runs = client.search_runs(["0"], max_results=100)
    (study,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "colours"]
    children = {
        r.data.tags["carclf.tune.trial_number"]: r
        for r in runs
        if r.data.tags.get(mlflow_tags.MLFLOW_PARENT_RUN_ID) == study.info.run_id
    }
    assert sorted(children) == ["0", "1"]
    finished, failed = children["0"], children["1"]
    assert finished.info.status == "FINISHED" and failed.info.status == "FAILED"
    # What the local[2] tune test checks, here with the trials in the Connect server's Python workers.
    for run in children.values():
        params = run.data.params
        assert params["depth"] == "18" and params["epochs"] == "2"
        assert 1e-3 <= float(params["learning_rate"]) <= 1e-2 and params["label_smoothing"] in ("0.0", "0.1")
        # The server's local[2] runs 2 trials at once: each gets half the cores, as on a local[2] session.
        assert params["tf_intra_op_threads"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
        assert params["train_data"] == str(tmp_path / "train.h5")  # resolved on the driver
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
        assert steps == ([0] if run is failed else [0, 1])
    assert "simulated trial failure" in failed.data.tags["carclf.error"]
    # The failed trial's reason on the console, in its one progress line.
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("[tune] trial 1 failed")]
    assert "simulated trial failure (CARCLF_TEST_FAIL_TRIAL=1)" in line, line
    champion = client.get_model_version_by_alias("carclf", "champion")
    assert champion.run_id == finished.info.run_id
    study = client.get_run(study.info.run_id)
    assert study.info.status == "FINISHED" and study.data.metrics["val_top1"] == finished.data.metrics["value"]
    assert 0.0 <= study.data.metrics["test_top1"] <= 1.0 and study.data.metrics["test_num_images"] == 16


# --------------------------------------------------------------------------------------------------
# train -P workers=2
# --------------------------------------------------------------------------------------------------
def _weights(folder: pathlib.Path, rank: int) -> list[np.ndarray]:
    with np.load(folder / f"worker-{rank}.npz") as saved:
        return [saved[k] for k in sorted(saved.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow
def test_two_workers_on_connect_train_exactly_like_local(connect_server, mw_splits, tmp_path):  # noqa: F811
    """The barrier stage on the Connect server and on a classic local[2], run at once: the same weights, bit for
    bit, on every worker of both; relative data paths given (the workers run in the server's folder)."""
    relative = {name: pathlib.Path(path).name for name, path in mw_splits.items()}
    launches = {}
    for kind, master in (("connect", connect_server), ("local", "local[2]")):
        dump = tmp_path / f"weights-{kind}"
        dump.mkdir()
        cli = _mw_cli(relative, tmp_path / f"checkpoints-{kind}") + ["--spark-master", master]
        launches[kind] = subprocess.Popen(
            [sys.executable, "-m", "entry_points.train", *cli],
            env=dict(
                os.environ,
                PYTHONPATH=str(REPO_ROOT),
                NO_PROXY="127.0.0.1,localhost",
                CARCLF_TEST_DUMP_WEIGHTS_DIR=str(dump),
                CARCLF_SPARK_LOG_DIR=str(tmp_path / "logs"),
            ),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    outputs = {kind: process.communicate(timeout=STEP_TIMEOUT_S) for kind, process in launches.items()}
    for kind, process in launches.items():
        assert process.returncode == 0, (kind, outputs[kind][1][-4000:])

    connect, local = _weights(tmp_path / "weights-connect", 0), _weights(tmp_path / "weights-local", 0)
    for a, b, c in zip(connect, _weights(tmp_path / "weights-connect", 1), local, strict=True):
        np.testing.assert_array_equal(a, b)  # the same all-reduced updates on both workers
        np.testing.assert_array_equal(a, c)  # and the same as the classic launch's
    client = MlflowClient()
    runs = {r.data.params["spark_master"]: r for r in client.search_runs(["0"])}
    assert set(runs) == {connect_server, "local[2]"}
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.params["num_replicas"] == "2" and run.data.params["per_replica_batch_size"] == "8"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == [0, 1], key
    for key in ("loss", "val_loss", "val_accuracy"):
        values = [[m.value for m in client.get_metric_history(r.info.run_id, key)] for r in runs.values()]
        assert sorted(values[0]) == sorted(values[1]), key
    assert not _worker_processes(str(tmp_path))


@pytest.mark.slow
def test_dead_worker_on_connect_fails_the_job_with_one_line_and_leaves_nothing(connect_server, mw_splits, tmp_path):  # noqa: F811
    cli = _mw_cli(mw_splits, tmp_path / "checkpoints") + ["--spark-master", connect_server]
    done = _step("train", cli, cwd=tmp_path, CARCLF_TEST_EXIT_WORKER="1")
    assert done.returncode == 1, done.stderr[-3000:]
    line = _one_error_line(done.stderr)
    assert "worker 1 of 2" in line and "exited with code 137" in line, line
    deadline = time.monotonic() + 30
    while _worker_processes(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _worker_processes(str(tmp_path))
