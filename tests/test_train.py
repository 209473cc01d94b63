"""`train`: two-phase freezing, per-epoch tracking, artifacts, registration, resume after a kill, bad inputs."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from carclf.data.hdf5_dataset import DatasetError, write_hdf5_split
from carclf.files.fingerprint import file_sha256
from carclf.training import run as training_run
from carclf.training.model import build_model
from carclf_flavor.images import PreprocessSettings
from conftest import REPO_ROOT
from entry_points import train as train_module
from entry_points.train import TrainConfig, TrainConfigError, train

SIZE = 32
CLASSES = ["red car", "green car", "blue car", "white car"]
TINY = dict(
    depth=18,
    width=0.125,
    weights="none",
    batch_size=16,
    optimizer="adam",
    learning_rate=0.003,
    online_augment=False,
    label_smoothing=0.0,
)


def _colour_set(path, per_class, seed, size=SIZE, classes=CLASSES):
    """Noise images whose class is a dominant colour channel: learnable in a few steps by a tiny network."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 80, (len(labels), size, size, 3)).astype(np.uint8)
    for c in range(len(classes)):
        if c < 3:
            images[labels == c, :, :, c] += 150
        else:
            images[labels == c] += 150
    return write_hdf5_split(path, images, labels, classes, PreprocessSettings(image_size=size))


@pytest.fixture
def splits(tmp_path):
    return {
        "train": str(_colour_set(tmp_path / "train.h5", 12, 0)),
        "val": str(_colour_set(tmp_path / "val.h5", 4, 1)),
        "test": str(_colour_set(tmp_path / "test.h5", 4, 2)),
    }


def _weights_by_path(model):
    return {v.path: np.array(v.numpy()) for v in model.weights}


def _client():
    import mlflow

    return mlflow.tracking.MlflowClient()


def test_two_phase_training_tracks_everything_and_registers(splits, tmp_path):
    checkpoints = tmp_path / "ckpt"
    result = train(
        train_data=splits["train"],
        val_data=splits["val"],
        test_data=splits["test"],
        epochs=2,
        head_epochs=1,
        checkpoint_dir=str(checkpoints),
        registered_model_name="carclf-test",
        **TINY,
    )
    client = _client()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"

    # Phase 1 really freezes: after the head epoch every backbone weight (BN statistics included) is still
    # the initial one, and the head moved. Phase 2 then changes the backbone.
    config = TrainConfig(train_data=splits["train"], val_data=splits["val"], epochs=2, head_epochs=1, **TINY)
    initial = _weights_by_path(build_model(config, len(CLASSES), SIZE))
    after = {}
    for epoch in (1, 2):
        model = build_model(config, len(CLASSES), SIZE)
        model.load_weights(str(checkpoints / f"epoch-{epoch:04d}" / "model.weights.h5"))
        after[epoch] = _weights_by_path(model)
    head = {p for p in initial if p.startswith("car_model/")}
    assert head and len(initial) > 20
    for path, value in initial.items():
        if path in head:
            assert not np.allclose(after[1][path], value), path
        else:
            np.testing.assert_array_equal(after[1][path], value, err_msg=path)
    assert any(not np.allclose(after[2][p], initial[p]) for p in initial if p not in head and "kernel" in p)

    # One value per epoch and metric (no double logging), train + val + learning rate.
    for key in ("loss", "accuracy", "top5", "val_loss", "val_accuracy", "val_top5", "learning_rate"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key
    rates = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "learning_rate")}
    assert rates[0] == pytest.approx(0.03) and rates[1] == pytest.approx(0.003)  # head at 10x, then lower

    params = run.data.params
    assert params["depth"] == "18" and params["head_epochs"] == "1" and params["optimizer"] == "adam"
    metrics = run.data.metrics
    assert 0.0 <= metrics["test_top1"] <= 1.0 and metrics["test_top5"] >= metrics["test_top1"]
    assert "test_macro_f1" in metrics and metrics["test_num_images"] == 16

    # Lineage: every input file with its content hash.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train.h5", "val.h5", "test.h5"}
    train_input = inputs["train.h5"]
    assert {t.key: t.value for t in train_input.tags}["sha256"] == file_sha256(splits["train"])
    assert run.data.tags["carclf.data.training.sha256"] == file_sha256(splits["train"])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/per_class_accuracy.csv",
        "evaluation/misclassified_gallery.png",
        "plots/training_curves.png",
    } <= artifacts
    local = client.download_artifacts(run.info.run_id, "evaluation/per_class_accuracy.csv", str(tmp_path / "dl"))
    import pandas as pd

    table = pd.read_csv(local)
    assert list(table["class_name"]) == CLASSES and table["support"].sum() == 16

    versions = client.search_model_versions("name = 'carclf-test'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert result["registered_version"] == str(versions[0].version)
    import carclf_flavor

    classifier = carclf_flavor.load_model(f"models:/carclf-test/{versions[0].version}")
    assert classifier.class_names == CLASSES and classifier.settings.image_size == SIZE

    # The finished run's checkpoint is marked done: a rerun starts a new run instead of resuming.
    assert json.loads((checkpoints / "latest.json").read_text())["finished"] is True


def _cli_args(splits, checkpoints, epochs):
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
        str(epochs),
        "--head-epochs",
        "1.0",
        "--batch-size",
        "16",
        "--optimizer",
        "adam",
        "--learning-rate",
        "0.003",
        "--online-augment",
        "false",
        "--label-smoothing",
        "0",
        "--checkpoint-dir",
        str(checkpoints),
        "--registered-model-name",
        "",
    ]


@pytest.mark.slow
def test_resume_after_kill_continues_same_run(splits, tmp_path):
    checkpoints = tmp_path / "ckpt"
    env = dict(os.environ, CARCLF_TEST_KILL_AFTER_EPOCH="2", PYTHONPATH=str(REPO_ROOT))
    killed = subprocess.run(
        [sys.executable, "-m", "entry_points.train", *_cli_args(splits, checkpoints, 3)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 137, killed.stderr[-2000:]
    state = json.loads((checkpoints / "latest.json").read_text())
    assert state["completed_epochs"] == 2 and state["phase"] == "full" and not state["finished"]
    client = _client()
    run_id = state["run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"  # a hard kill leaves no chance to close the run
    # Both epochs' metrics survive the kill: on the server, or still in the outbox beside the checkpoint.
    outbox = checkpoints / "pending_metrics.jsonl"
    queued = {json.loads(line)["step"] for line in outbox.read_text().splitlines()} if outbox.exists() else set()
    assert sorted({m.step for m in client.get_metric_history(run_id, "loss")} | queued) == [0, 1]

    # Rerun with the same parameters and checkpoint_dir (no explicit resume flag): continues at epoch 3.
    assert train_module.main(_cli_args(splits, checkpoints, 3)) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1, 2]
    assert run.data.tags["carclf.resumed_from_epoch"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert any(a.path == "model" for a in client.list_artifacts(run_id)) or client.search_logged_models(
        experiment_ids=[run.info.experiment_id]
    )


def test_failure_ends_run_failed_and_interrupt_killed(splits, tmp_path, monkeypatch):
    client = _client()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash while building the network")

    monkeypatch.setattr(training_run, "build_model", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            train_data=splits["train"],
            val_data=splits["val"],
            epochs=1,
            head_epochs=0,
            checkpoint_dir=str(tmp_path / "a"),
            **TINY,
        )
    failed = client.search_runs([client.get_experiment_by_name("Default").experiment_id])[0]
    assert failed.info.status == "FAILED"
    assert "simulated crash" in failed.data.tags["carclf.error"]
    downloaded = client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path))
    text = open(downloaded).read()
    assert "Traceback" in text and "RuntimeError: simulated crash" in text

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_run, "build_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(
            train_data=splits["train"],
            val_data=splits["val"],
            epochs=1,
            head_epochs=0,
            checkpoint_dir=str(tmp_path / "b"),
            **TINY,
        )
    runs = client.search_runs([failed.info.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "KILLED"


def _without_dataset(path, name):
    with h5py.File(path, "a") as f:
        del f[name]
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_dataset", "missing dataset(s) labels"),
        ("class_lists_differ", "class list differs"),
        ("image_sizes_differ", "image size 40 differs"),
        ("weights_missing", "weights: /nonexistent/resnet.weights.h5 does not exist"),
        ("imagenet_depth18", "weights=imagenet exists only for depth"),
        ("head_epochs", "head_epochs must be between 0 and epochs"),
    ],
)
def test_bad_inputs_fail_with_one_line_before_training(splits, tmp_path, capsys, case, message):
    args = dict(train_data=splits["train"], val_data=splits["val"], test_data=splits["test"])
    overrides = {}
    if case == "missing_dataset":
        args["val_data"] = str(_without_dataset(_colour_set(tmp_path / "broken.h5", 2, 3), "labels"))
    elif case == "class_lists_differ":
        args["test_data"] = str(_colour_set(tmp_path / "other.h5", 2, 3, classes=["a", "b", "c", "d", "e"]))
    elif case == "image_sizes_differ":
        args["test_data"] = str(_colour_set(tmp_path / "big.h5", 2, 3, size=40))
    elif case == "weights_missing":
        overrides["weights"] = "/nonexistent/resnet.weights.h5"
    elif case == "imagenet_depth18":
        overrides["weights"] = "imagenet"
    elif case == "head_epochs":
        overrides["head_epochs"] = 5
    options = dict(TINY, epochs=2, head_epochs=0, **{"checkpoint_dir": str(tmp_path / "ckpt")})
    options.update(overrides)
    with pytest.raises((TrainConfigError, DatasetError), match=message.replace("(", r"\(").replace(")", r"\)")):
        train(**args, **options)
    assert not (tmp_path / "ckpt").exists()  # nothing trained, nothing checkpointed
    assert _client().search_runs(["0"]) == []  # no run is created for unusable input

    # The CLI says the same in one line on stderr, exit code 2.
    argv = [
        "--train-data",
        args["train_data"],
        "--val-data",
        args["val_data"],
        "--test-data",
        args["test_data"],
        "--depth",
        "18",
        "--width",
        str(options["width"]),
        "--weights",
        options["weights"],
        "--epochs",
        "2",
        "--head-epochs",
        str(options["head_epochs"]),
    ]
    assert train_module.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


@pytest.mark.slow
def test_learnability_on_sample_data_cut_down(tmp_path):
    """The bundled sample data (generated photos -> bbox crop) is learnable: far above the 10% chance level.

    Cut-down of the `make run` configuration (64 px, 20 epochs, width 0.25 -> ~97% test top-1): 48 px,
    smaller photos, 12 epochs, 6 test photos per class.
    """
    from carclf.data.sample_data import generate_sample_dataset
    from entry_points.preprocess import preprocess

    root = generate_sample_dataset(
        tmp_path / "sample", num_classes=10, train_per_class=24, test_per_class=6, min_width=160, max_width=240
    )
    # workers=1: a few dozen photos are decoded faster in-process than by a worker pool.
    splits = preprocess(data_dir=root, output_dir=tmp_path / "processed", image_size=48, crop="bbox", workers=1)
    result = train(
        train_data=splits["train"],
        val_data=splits["val"],
        test_data=splits["test"],
        depth=18,
        width=0.25,
        weights="none",
        epochs=12,
        head_epochs=0,
        batch_size=16,
        learning_rate=0.003,
        optimizer="adam",
        online_augment=True,
        label_smoothing=0.1,
        checkpoint_dir=str(tmp_path / "ckpt"),
        registered_model_name="",
    )
    assert result["metrics"]["test_num_images"] == 60
    assert result["metrics"]["test_top1"] >= 0.3, result["metrics"]  # chance: 0.1


def test_two_runs_logging_the_same_new_dataset_at_once_both_record_it(splits):
    """`tune`'s parallel trials log the same new files at the same moment. MLflow's store looks for the dataset
    row, then inserts it: here the other run's insert is made to commit in between (from another thread, on
    its own connection to the same SQLite store), so this run's insert hits the unique key, as it did in CI."""
    import threading

    import mlflow
    from sqlalchemy import event

    from carclf.data.input_pipeline import HDF5Source
    from carclf.tracking.lineage import log_dataset_inputs

    source = HDF5Source.open(splits["train"])
    other_run = _client().create_run(mlflow.get_experiment_by_name("Default").experiment_id).info.run_id

    def other_run_logs_the_same_file():
        with mlflow.start_run(run_id=other_run):
            log_dataset_inputs(source, "training")

    engine = mlflow.tracking._tracking_service.utils._get_store().engine
    raced = []

    def before_insert(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS") and not raced:
            raced.append(statement)
            racer = threading.Thread(target=other_run_logs_the_same_file)
            racer.start()
            racer.join()

    event.listen(engine, "before_cursor_execute", before_insert)
    try:
        with mlflow.start_run() as run:
            log_dataset_inputs(source, "training")
    finally:
        event.remove(engine, "before_cursor_execute", before_insert)
    assert raced, "the race was not staged: MLflow no longer inserts datasets this way"
    digest = file_sha256(splits["train"])
    for run_id in (run.info.run_id, other_run):
        (logged,) = _client().get_run(run_id).inputs.dataset_inputs
        assert logged.dataset.name == "train.h5" and {t.key: t.value for t in logged.tags}["sha256"] == digest
    assert _client().get_run(run.info.run_id).data.tags["carclf.data.training.sha256"] == digest
