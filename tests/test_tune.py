"""`tune`: trials as Spark tasks and MLflow child runs, a failing trial, resume, registration, bad spaces;
and `train`'s from-scratch defaults."""

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from carclf.data.hdf5_dataset import write_hdf5_split
from carclf.tuning.search_space import Choice, Fixed, Range, SearchSpaceError, check_space, load_space, sample
from carclf_flavor.images import PreprocessSettings
from conftest import REPO_ROOT
from entry_points import tune as tune_module

SIZE = 32
CLASSES = ["red car", "green car", "blue car", "white car"]
# A tiny network for 2 epochs; the trials differ in learning rate and label smoothing.
SPACE_YAML = """\
depth: 18
width: 0.125
epochs: 2
head_epochs: 0
batch_size: 16
online_augment: false
optimizer: adam
learning_rate: {low: 1e-3, high: 1e-2, log: true}
label_smoothing: [0.0, 0.1]
"""
STUDY = "colours"


def _colour_set(path, per_class, seed):
    """Noise images whose class is a dominant colour channel: learnable in a few steps by a tiny network."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 80, (len(labels), SIZE, SIZE, 3)).astype(np.uint8)
    for c in range(len(CLASSES)):
        if c < 3:
            images[labels == c, :, :, c] += 150
        else:
            images[labels == c] += 150
    return str(write_hdf5_split(path, images, labels, CLASSES, PreprocessSettings(image_size=SIZE)))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Data, a space file and one tracking store shared by the module's `mlflow run -e tune` runs."""
    root = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment_id = MlflowClient(uri).create_experiment("tune", artifact_location=str(root / "artifacts"))
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_REGISTRY_URI=uri,
        MLFLOW_EXPERIMENT_ID=experiment_id,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("MLFLOW_RUN_ID", None)
    (root / "space.yaml").write_text(SPACE_YAML)
    data = {
        "train": _colour_set(root / "train.h5", 12, 0),
        "val": _colour_set(root / "val.h5", 4, 1),
        "test": _colour_set(root / "test.h5", 4, 2),
    }
    return {"root": root, "uri": uri, "experiment_id": experiment_id, "env": env, "data": data}


def _mlflow_run_tune(project, extra_env=None, **overrides):
    data = project["data"]
    params = {
        "train_data": data["train"],
        "val_data": data["val"],
        "test_data": data["test"],
        "trials": "4",
        "parallel": "2",
        "space": str(project["root"] / "space.yaml"),
        "spark_master": "local[2]",
        "study_name": STUDY,
        **overrides,
    }
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"),
        "run",
        str(REPO_ROOT),
        "-e",
        "tune",
        "--env-manager",
        "local",
    ]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    result = subprocess.run(
        cmd,
        cwd=project["root"],
        env=dict(project["env"], **(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _rank(run):
    """The study's order: the higher final val top-1, then the earlier trial."""
    return run.data.metrics["value"], -int(run.data.tags["carclf.tune.trial_number"])


def _client(project):
    return MlflowClient(project["uri"], registry_uri=project["uri"])


def _tune_runs(project):
    runs = _client(project).search_runs(
        [project["experiment_id"]], max_results=1000, order_by=["attributes.start_time ASC"]
    )
    return [r for r in runs if r.data.tags.get(mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT) == "tune"]


def _children(project, parent_id):
    return [
        r
        for r in _client(project).search_runs([project["experiment_id"]], max_results=1000)
        if r.data.tags.get(mlflow_tags.MLFLOW_PARENT_RUN_ID) == parent_id
    ]


@pytest.fixture(scope="module")
def first_run(project):
    """4 trials, 2 at a time on local[2]; trial 1 fails after its first epoch (inside train)."""
    result = _mlflow_run_tune(project, extra_env={"CARCLF_TEST_FAIL_TRIAL": "1"})
    (study_run,) = _tune_runs(project)
    return {"result": result, "study_run": study_run, "children": _children(project, study_run.info.run_id)}


@pytest.mark.slow
def test_trials_are_child_runs_and_the_best_is_registered(project, first_run):
    client = _client(project)
    study = client.get_run(first_run["study_run"].info.run_id)
    children = first_run["children"]
    assert study.info.status == "FINISHED" and study.data.tags["mlflow.runName"] == STUDY
    assert len(children) == 4
    by_state = {}
    for run in children:
        by_state.setdefault(run.info.status, []).append(run)
        params = run.data.params
        assert params["depth"] == "18" and params["optimizer"] == "adam" and params["epochs"] == "2"
        assert 1e-3 <= float(params["learning_rate"]) <= 1e-2 and params["label_smoothing"] in ("0.0", "0.1")
        threads = max(1, len(os.sched_getaffinity(0)) // 2)
        assert params["tf_intra_op_threads"] == str(threads)
        # Validation top-1 of every epoch (one point each), from the same callback as `train`.
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
        assert steps == ([0] if run.info.status == "FAILED" else [0, 1])
    assert len(by_state.get("FAILED", [])) == 1 and len(by_state.get("FINISHED", [])) == 3, by_state.keys()
    failed = by_state["FAILED"][0]
    assert failed.data.tags["carclf.tune.trial_number"] == "1"
    assert "simulated trial failure" in failed.data.tags["carclf.error"]
    error_file = client.download_artifacts(failed.info.run_id, "error_message.txt", str(project["root"]))
    assert "RuntimeError: simulated trial failure" in open(error_file).read()

    # The best complete trial (highest final val top-1) is registered with the alias, its model loads.
    finished = by_state["FINISHED"]
    best = max(finished, key=_rank)
    assert all(r.data.metrics["value"] == r.data.metrics["val_accuracy"] for r in finished)
    champion = client.get_model_version_by_alias("carclf", "champion")
    assert champion.run_id == best.info.run_id
    assert study.data.tags["carclf.best_trial_run"] == best.info.run_id
    assert study.data.metrics["val_top1"] == best.data.metrics["value"]
    assert 0.0 <= study.data.metrics["test_top1"] <= 1.0 and study.data.metrics["test_num_images"] == 16
    assert study.data.metrics["trials_complete"] == 3 and study.data.metrics["trials_fail"] == 1
    # Trials log no model, only their final weights; the best trial's model is logged once, after the study,
    # into its run, with the int8 network calibrated and validated as `train` does.
    for run in finished:
        kept = {a.path for a in client.list_artifacts(run.info.run_id, "tune")}
        assert {"tune/model.weights.h5", "tune/train_params.json"} <= kept
        has_model = "carclf.model_uri" in client.get_run(run.info.run_id).data.tags
        assert has_model == (run.info.run_id == best.info.run_id), run.info.run_id
    best_after = client.get_run(best.info.run_id)
    assert best_after.info.status == "FINISHED"
    assert best_after.data.metrics["int8_validation_images"] == 16
    # The rebuilt network is the trained one: its float32 top-1 on the validation split is the trial's last.
    assert abs(best_after.data.metrics["int8_float32_top1"] - best.data.metrics["val_accuracy"]) <= 1 / 16 + 1e-6
    import carclf_flavor
    from carclf.data.input_pipeline import HDF5Source

    mlflow.set_tracking_uri(project["uri"])
    mlflow.set_registry_uri(project["uri"])
    classifier = carclf_flavor.load_model("models:/carclf@champion")
    assert classifier.class_names == CLASSES
    test_set = HDF5Source.open(project["data"]["test"])
    pixels, labels = test_set.read_rows(np.arange(test_set.num_images))
    top1 = float(np.mean(np.argmax(classifier.predict_pixels(pixels), axis=1) == labels))
    assert top1 == pytest.approx(study.data.metrics["test_top1"])  # the champion predicts; its test metrics are ours

    plots = {a.path for a in client.list_artifacts(study.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png", "plots/parallel_coordinate.png"} <= plots

    # Progress: one line per finished trial with its number, value, params and the best so far.
    lines = [line for line in first_run["result"].stdout.splitlines() if line.startswith("[tune] trial ")]
    assert len(lines) == 4 and all("best so far" in line or "no complete trial yet" in line for line in lines[:1])
    assert sorted(int(line.split()[2]) for line in lines) == [0, 1, 2, 3]
    assert any("learning_rate:" in line and "val top-1" in line for line in lines)
    assert "best so far" in lines[-1]


@pytest.mark.slow
def test_rerun_with_same_study_name_resumes_without_repeating(project, first_run):
    before = {r.info.run_id: r for r in first_run["children"]}
    result = _mlflow_run_tune(project)  # the same command, no simulated failure: makes up for the failed trial
    assert "resuming study 'colours'" in result.stdout and "3 finished trial(s) kept, 1 to run" in result.stdout
    client = _client(project)
    study_id = first_run["study_run"].info.run_id
    children = _children(project, study_id)
    assert len(children) == 5
    new = [r for r in children if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    assert new[0].data.tags["carclf.tune.trial_number"] == "4"
    for run in children:  # the finished trials were not run again
        if run.info.run_id in before:
            assert run.info.end_time == before[run.info.run_id].info.end_time
            assert run.info.status == before[run.info.run_id].info.status
    rerun = [r for r in _tune_runs(project) if r.info.run_id != study_id]
    assert len(rerun) == 1 and rerun[0].data.tags["carclf.resumed_into_run"] == study_id
    assert client.get_run(study_id).info.status == "FINISHED"
    champion = client.get_model_version_by_alias("carclf", "champion")
    best = max((r for r in children if r.info.status == "FINISHED"), key=_rank)
    assert champion.run_id == best.info.run_id


@pytest.mark.parametrize(
    "text, message",
    [
        ("depth: [18, 34\nwidth: 0.5\n", "invalid YAML at line"),
        ("learning_rat: {low: 0.001, high: 0.01}\n", "learning_rat: not a train parameter"),
        ("learning_rate: {low: 0.01, high: 0.001}\n", "learning_rate: low (0.01) must be below high (0.001)"),
        ("learning_rate: {low: 0, high: 0.01, log: true}\n", "learning_rate: a log range needs low > 0"),
        ("epochs: {low: 2.5, high: 5}\n", "epochs: epochs is an integer: low and high must be integers"),
        ("optimizer: [adam, rmsprop]\n", "optimizer: value 'rmsprop' is refused by train"),
        ("epochs: [2, 3]\nhead_epochs: {low: 0, high: 3}\n", "head_epochs: value 3 is refused by train"),
        ("- depth\n", "expected a mapping"),
    ],
)
def test_bad_space_is_one_line_before_any_trial(tmp_path, capsys, text, message):
    train_h5, val_h5 = _colour_set(tmp_path / "train.h5", 2, 0), _colour_set(tmp_path / "val.h5", 1, 1)
    space = tmp_path / "space.yaml"
    space.write_text(text)
    rc = tune_module.main(
        ["--train-data", train_h5, "--val-data", val_h5, "--space", str(space), "--spark-master", "local[1]"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and str(space) in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert MlflowClient().search_runs(["0"]) == []  # nothing started


def test_space_forms_and_sampling(tmp_path):
    import optuna

    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "weights: none\nbatch_size: [16, 32]\nepochs: {low: 2, high: 4}\n"
        "learning_rate: {low: 1e-4, high: 1e-2, log: true}\ndropout: {low: 0, high: 0.5}\n"
    )
    space = load_space(space_file)
    assert space["weights"] == Fixed("none") and space["batch_size"] == Choice((16, 32))
    assert space["epochs"] == Range(2, 4) and space["epochs"].integer
    assert space["learning_rate"] == Range(1e-4, 1e-2, True) and not space["learning_rate"].integer
    assert not space["dropout"].integer  # 0 and 0.5: a float range
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = sample(trial, space)
        assert params["weights"] == "none" and params["batch_size"] in (16, 32)
        assert isinstance(params["epochs"], int) and 2 <= params["epochs"] <= 4
        assert 1e-4 <= params["learning_rate"] <= 1e-2 and 0 <= params["dropout"] <= 0.5
        seen.add(params["epochs"])
        study.tell(trial, 0.5)
    assert seen == {2, 3, 4}
    # The default space passes train's own checks on real files.
    train_h5, val_h5 = _colour_set(tmp_path / "train.h5", 2, 0), _colour_set(tmp_path / "val.h5", 1, 1)
    check_space(load_space(""), train_h5, val_h5)
    with pytest.raises(SearchSpaceError, match="depth: value 19 is refused by train"):
        check_space(load_space(_write(tmp_path / "bad.yaml", "depth: [18, 19]\n")), train_h5, val_h5)


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.slow
def test_from_scratch_defaults_learn_clearly_better_than_sgd(tmp_path):
    """weights=none with train's own defaults vs the old fine-tuning defaults (SGD 0.001), same epochs."""
    from carclf.data.sample_data import generate_sample_dataset
    from entry_points.preprocess import preprocess
    from entry_points.train import train

    root = generate_sample_dataset(
        tmp_path / "sample", num_classes=10, train_per_class=24, test_per_class=6, min_width=160, max_width=240
    )
    splits = preprocess(
        data_dir=str(root), output_dir=str(tmp_path / "processed"), image_size=48, crop="bbox", workers=1
    )
    common = dict(depth=18, width=0.25, weights="none", epochs=12, batch_size=16, registered_model_name="")
    defaults = train(
        train_data=splits["train"],
        val_data=splits["val"],
        test_data=splits["test"],
        checkpoint_dir=str(tmp_path / "a"),
        **common,
    )
    sgd = train(
        train_data=splits["train"],
        val_data=splits["val"],
        test_data=splits["test"],
        optimizer="sgd",
        learning_rate=0.001,
        checkpoint_dir=str(tmp_path / "b"),
        **common,
    )
    params = MlflowClient().get_run(defaults["run_id"]).data.params
    assert params["optimizer_used"] == "adam" and float(params["learning_rate_used"]) == 0.003
    assert params["optimizer"] == "adam"
    top1, sgd_top1 = defaults["metrics"]["test_top1"], sgd["metrics"]["test_top1"]
    assert top1 >= sgd_top1 + 0.15 and top1 >= 0.3, (top1, sgd_top1)  # chance: 0.1


def test_fine_tuning_defaults_stay_for_pretrained_weights():
    from entry_points.train import optimizer_defaults

    assert optimizer_defaults("imagenet") == ("sgd", 0.001)
    assert optimizer_defaults("/some/weights.h5", "auto", 0) == ("sgd", 0.001)
    assert optimizer_defaults("none") == ("adam", 0.003)
    assert optimizer_defaults("none", "sgd", 0.01) == ("sgd", 0.01)  # explicit values win
    assert optimizer_defaults("imagenet", "adam", 0) == ("adam", 0.001)
