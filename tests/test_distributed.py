"""Training on several devices and processes: MirroredStrategy over two logical CPUs matches one device."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO_ROOT
from helpers_processes import wait_until
from test_train import _colour_set

# One fresh process: logical devices must be configured before TensorFlow initialises its runtime.
MIRRORED_CHILD = textwrap.dedent("""
    import json, sys
    import h5py, numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from entry_points.train import train

    def final_weights(folder):
        with h5py.File(folder / "model.weights.h5", "r") as f:
            out = {}
            f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out

    import pathlib
    args = json.loads(sys.argv[1])
    results = {}
    for name, strategy, batch in (("one", "one", 16), ("mirrored", "mirrored", 16), ("half_batch", "one", 8)):
        ckpt = pathlib.Path(args["tmp"]) / name
        out = train(train_data=args["train"], val_data=args["val"], depth=18, width=0.125, weights="none", epochs=2, head_epochs=1,
                    batch_size=batch, optimizer="sgd", learning_rate=0.0002, momentum=0.9, online_augment=False,
                    label_smoothing=0.0, checkpoint_dir=str(ckpt), registered_model_name="", strategy=strategy)
        import mlflow
        params = mlflow.get_run(out["run_id"]).data.params
        weights = final_weights(sorted(ckpt.glob("epoch-*"))[-1])
        np.savez(ckpt / "weights.npz", **{k.replace("/", "|"): v for k, v in weights.items()})
        results[name] = {"replicas": params["num_replicas"], "per_replica": params["per_replica_batch_size"]}
    print(json.dumps(results))
""")


def _weights(path):
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


@pytest.mark.slow
def test_mirrored_over_two_cpus_matches_one_device(tmp_path):
    train = str(_colour_set(tmp_path / "train.h5", 12, 0))
    val = str(_colour_set(tmp_path / "val.h5", 4, 1))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [sys.executable, "-c", MIRRORED_CHILD, json.dumps({"train": train, "val": val, "tmp": str(tmp_path)})],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    logged = json.loads(out.stdout.strip().splitlines()[-1])
    assert logged["one"] == {"replicas": "1", "per_replica": "16"}
    assert logged["mirrored"] == {"replicas": "2", "per_replica": "8"}

    one, mirrored, half = (_weights(tmp_path / n / "weights.npz") for n in ("one", "mirrored", "half_batch"))
    assert one.keys() == mirrored.keys()

    # Per variable, relative to its largest entry (BN moving variances of uint8-scaled input reach 1e5).
    def relative(a, b):
        return max(float(np.max(np.abs(a[k] - b[k])) / (np.max(np.abs(a[k])) + 1e-6)) for k in a)

    diff, control = relative(one, mirrored), relative(one, half)
    # Same global batch and order: the runs differ only in float32 arithmetic (gradients summed per replica
    # then across; synchronized BN moments as E[x^2] - E[x]^2 instead of tf.nn.moments). Measured here: median
    # 2e-6, worst 1.1e-4 (a momentum buffer) after 6 SGD steps. A real mismatch (half batch per replica,
    # unsynchronized BN statistics, gradients not averaged over the global batch) moves weights by the size
    # of the updates: the control at batch 8 measured 20.9, five orders of magnitude above the tolerance.
    assert control > 1e-2, control
    assert diff < 1e-3, (diff, control)


# --------------------------------------------------------------------------------------------------
# Sharding: every row exactly once per epoch across the workers, the global batches of one process
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_row_exactly_once_per_epoch_across_workers(workers):
    from carclf.data.input_pipeline import epoch_order
    from carclf.data.row_sharding import worker_steps

    rows_per_file, batch = [300, 157], 30  # 457 rows: the last global batch is short (7 rows)
    for epoch in (0, 1):
        shards = [worker_steps(rows_per_file, epoch, 5, batch, w, workers) for w in range(workers)]
        assert len({len(s) for s in shards}) == 1  # same number of steps on every worker (collectives)
        seen = np.concatenate([rows for shard in shards for rows, _ in shard])
        assert sorted(seen) == list(range(457))
        # Step by step the workers together read exactly the global batch one process reads.
        single = epoch_order(rows_per_file, epoch, 5)
        for step in range(len(shards[0])):
            together = np.concatenate([shards[w][step][0] for w in range(workers)])
            np.testing.assert_array_equal(together, single[step * batch : (step + 1) * batch])
            assert all(shards[w][step][1] == len(together) for w in range(workers))
    first = np.concatenate([r for r, _ in worker_steps(rows_per_file, 0, 5, batch, 0, workers)])
    second = np.concatenate([r for r, _ in worker_steps(rows_per_file, 1, 5, batch, 0, workers)])
    assert np.mean(first[: len(second)] != second[: len(first)]) > 0.9  # seeded per epoch: orders differ


def test_worker_reads_only_its_rows(tmp_path):
    from carclf.data.input_pipeline import HDF5Source
    from carclf.data.row_sharding import worker_batches
    from test_input_pipeline import _decoded_index, _write_indexed

    source = HDF5Source.open([_write_indexed(tmp_path / "a.h5", 0, 100), _write_indexed(tmp_path / "b.h5", 100, 37)])
    for worker in range(2):
        for images, _labels, rows, global_rows in worker_batches(source, 0, 1, 16, worker, 2):
            np.testing.assert_array_equal(_decoded_index(images), rows)  # the pixels of exactly those rows
            assert len(rows) <= 8 and global_rows in (16, 137 % 16)


# --------------------------------------------------------------------------------------------------
# Two worker processes under MultiWorkerMirroredStrategy, launched by a Spark barrier stage (local[2])
# --------------------------------------------------------------------------------------------------
MW_ARGS = dict(
    depth=18,
    width=0.125,
    weights="none",
    epochs=2,
    head_epochs=1,
    batch_size=16,
    optimizer="sgd",
    learning_rate=0.0002,
    momentum=0.9,
    online_augment=False,
    label_smoothing=0.0,
    registered_model_name="",
)


def _mw_cli(splits, checkpoints, workers=2):
    return [
        "--train-data",
        splits["train"],
        "--val-data",
        splits["val"],
        "--depth",
        "18",
        "--width",
        "0.125",
        "--weights",
        "none",
        "--epochs",
        "2",
        "--head-epochs",
        "1",
        "--batch-size",
        "16",
        "--optimizer",
        "sgd",
        "--learning-rate",
        "0.0002",
        "--online-augment",
        "false",
        "--label-smoothing",
        "0",
        "--checkpoint-dir",
        str(checkpoints),
        "--registered-model-name",
        "",
        "--workers",
        str(workers),
        "--spark-master",
        f"local[{workers}]",
    ]


@pytest.fixture
def mw_splits(tmp_path):
    return {"train": str(_colour_set(tmp_path / "train.h5", 12, 0)), "val": str(_colour_set(tmp_path / "val.h5", 4, 1))}


def _worker_processes(marker: str) -> list[int]:
    """PIDs of training worker processes whose environment mentions ``marker`` (this test's folder)."""
    found = []
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{proc}/cmdline", "rb").read()
            environ = open(f"/proc/{proc}/environ", "rb").read()
        except OSError:
            continue
        if b"carclf.training.multi_worker_process" in cmdline and marker.encode() in environ:
            found.append(int(proc))
    return found


def _env(tmp_path, **extra):
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), NO_PROXY="127.0.0.1,localhost", **extra)


@pytest.mark.slow
def test_two_workers_killed_then_resumed_train_like_one_process_into_one_run(mw_splits, tmp_path):
    """Two workers (a Spark barrier stage) through the head phase, the chief killed after it, the job run again:
    it resumes from the chief's checkpoint into the same run for the whole-network phase, both workers end with
    the same weights, and those are one process's (same data, same seed) but for float32 summation order.
    One job killed and resumed covers the uninterrupted one too: two launches, not three."""
    import mlflow

    from carclf.training.model import build_model
    from entry_points import train as train_module

    cli = _mw_cli(mw_splits, tmp_path / "mw")
    killed = subprocess.run(
        [sys.executable, "-m", "entry_points.train", *cli],
        env=_env(tmp_path, CARCLF_TEST_KILL_AFTER_EPOCH="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert killed.returncode != 0
    state = json.loads((tmp_path / "mw" / "latest.json").read_text())
    assert state["completed_epochs"] == 1 and not state["finished"]
    dump = tmp_path / "weights"
    dump.mkdir()
    resumed = subprocess.run(
        [sys.executable, "-m", "entry_points.train", *cli],
        env=_env(tmp_path, CARCLF_TEST_DUMP_WEIGHTS_DIR=str(dump)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == state["run_id"]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["carclf.resumed_from_epoch"] == "1"
    assert run.data.params["num_replicas"] == "2" and run.data.params["per_replica_batch_size"] == "8"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1], key
    assert not _worker_processes(str(tmp_path))

    chief, other = (np.load(dump / f"worker-{w}.npz") for w in (0, 1))
    chief = [chief[k] for k in sorted(chief.files, key=lambda k: int(k.split("_")[1]))]
    other = [other[k] for k in sorted(other.files, key=lambda k: int(k.split("_")[1]))]
    for a, b in zip(chief, other):  # the same all-reduced updates on both workers
        np.testing.assert_array_equal(a, b)

    single = train_module.train(
        train_data=mw_splits["train"],
        val_data=mw_splits["val"],
        checkpoint_dir=str(tmp_path / "one"),
        strategy="one",
        **MW_ARGS,
    )
    config = train_module.TrainConfig(train_data=mw_splits["train"], val_data=mw_splits["val"], seed=0, **MW_ARGS)
    model = build_model(config, 4, 32)
    model.load_weights(str(sorted((tmp_path / "one").glob("epoch-*"))[-1] / "model.weights.h5"))
    reference = model.get_weights()
    relative = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-6)) for a, b in zip(reference, chief))
    # As for MirroredStrategy: only float32 summation order differs (see the test above for the scale).
    assert relative < 1e-3, relative
    assert single["run_id"] != run.info.run_id


@pytest.mark.slow
def test_dead_worker_fails_the_job_with_one_line_and_leaves_nothing(mw_splits, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "entry_points.train", *_mw_cli(mw_splits, tmp_path / "mw")],
        env=_env(tmp_path, CARCLF_TEST_EXIT_WORKER="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,  # a job that waited on its dead worker would hang here
    )
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "worker 1 of 2" in errors[0] and "signal 9" not in errors[0], out.stderr[-3000:]
    assert "exited with code 137" in errors[0]
    assert wait_until(lambda: not _worker_processes(str(tmp_path)), timeout_s=20), _worker_processes(str(tmp_path))


def test_mixed_float16_trains_with_loss_scaling(tmp_path, monkeypatch):
    import math

    import mlflow

    from carclf.training import run as training_run
    from entry_points import train as train_module

    seen = {}
    compile_for_real = training_run.compile_for_phase

    def compile_and_look(model, config, phase, learning_rate):
        compile_for_real(model, config, phase, learning_rate)
        seen["optimizer"] = type(model.optimizer).__name__

    monkeypatch.setattr(training_run, "compile_for_phase", compile_and_look)
    result = train_module.train(
        train_data=str(_colour_set(tmp_path / "train.h5", 12, 0)),
        val_data=str(_colour_set(tmp_path / "val.h5", 4, 1)),
        depth=18,
        width=0.125,
        weights="none",
        epochs=1,
        head_epochs=0,
        batch_size=16,
        optimizer="adam",
        learning_rate=0.003,
        precision="mixed_float16",
        checkpoint_dir=str(tmp_path / "ckpt"),
        registered_model_name="",
    )
    assert seen["optimizer"] == "LossScaleOptimizer"  # Keras wraps the optimizer for float16
    losses = mlflow.tracking.MlflowClient().get_metric_history(result["run_id"], "loss")
    assert len(losses) == 1 and math.isfinite(losses[0].value)
