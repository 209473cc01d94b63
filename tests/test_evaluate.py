"""`evaluate`: metrics + artifacts in a new run linked to the model; the served pyfunc path on the original
JPEG files gives the same top-1 (image by image) as the Keras model on the HDF5 pixels."""

import numpy as np
import pytest

from carclf.data.hdf5_dataset import read_split
from carclf_flavor.precision import ENV_VAR as PRECISION_ENV_VAR
from entry_points import evaluate as evaluate_module
from entry_points.evaluate import EvaluateError, evaluate

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Sample photos -> HDF5 (bbox crop, 32 px) -> a tiny ResNet trained a few epochs -> a saved carclf model."""
    import keras
    import mlflow

    import carclf_flavor
    from carclf.data.input_pipeline import HDF5Source, make_dataset
    from carclf.data.sample_data import generate_sample_dataset
    from carclf_flavor.resnet import build_resnet
    from entry_points.preprocess import preprocess

    base = tmp_path_factory.mktemp("evaluate")
    # This fixture outlives the per-test MLflow store: give preprocess (which tracks its run) its own.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        uri = f"sqlite:///{base / 'fixture.db'}"
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        root = generate_sample_dataset(
            base / "sample", num_classes=4, train_per_class=16, test_per_class=8, min_width=140, max_width=220
        )
        splits = preprocess(data_dir=root, output_dir=base / "processed", image_size=SIZE, crop="bbox", workers=1)
        while mlflow.active_run() is not None:
            mlflow.end_run()
    source = HDF5Source.open(splits["train"])
    keras.utils.set_random_seed(0)
    model = build_resnet(depth=18, num_classes=source.num_classes, image_size=SIZE, width=0.125)
    from carclf.training.model import set_batchnorm_momentum

    set_batchnorm_momentum(model, 0.9)  # a few steps only: let the BN statistics follow
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy")
    model.fit(
        make_dataset(source, 16, epochs=None, seed=0),
        steps_per_epoch=source.steps(16),
        epochs=8,
        verbose=0,
        shuffle=False,
    )
    model_path = base / "model"
    carclf_flavor.save_model(model, model_path, list(source.class_names), preprocessing=source.settings)
    return {
        "model": model,
        "model_path": str(model_path),
        "root": str(root),
        "class_names": list(source.class_names),
        **{k: str(v) for k, v in splits.items()},
    }


def test_evaluate_logs_metrics_artifacts_and_links_the_model(trained, capsys):
    import mlflow

    result = evaluate(model_uri=trained["model_path"], test_data=trained["test"], batch_size=8)
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert {"test_top1", "test_top5", "test_macro_f1", "test_num_images"} <= set(metrics)
    assert metrics["test_num_images"] == 32
    assert metrics["test_top5"] >= metrics["test_top1"]
    assert run.data.tags["carclf.evaluated_model_uri"] == trained["model_path"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/per_class_accuracy.csv",
        "evaluation/misclassified_gallery.png",
    } <= artifacts

    # The numbers are the model's: recompute top-1 from the network on the stored pixels.
    import carclf_flavor

    classifier = carclf_flavor.load_model(trained["model_path"])
    images, labels = read_split(trained["test"])
    expected = float(np.mean(classifier.predict_pixels(images).argmax(axis=1) == labels))
    assert metrics["test_top1"] == pytest.approx(expected)

    # The CLI prints a short table.
    assert evaluate_module.main(["--model-uri", trained["model_path"], "--test-data", trained["test"]]) == 0
    out = capsys.readouterr().out
    assert "top1" in out and "macro_f1" in out


def test_served_pyfunc_on_jpeg_bytes_matches_keras_on_hdf5(trained, monkeypatch):
    # float32 serving, so the saved (fused) network is compared with the trained Keras network itself.
    monkeypatch.setenv(PRECISION_ENV_VAR, "float32")
    images, labels = read_split(trained["test"])
    keras_top1 = trained["model"].predict(images, verbose=0).argmax(axis=1)

    via_jpeg = evaluate(
        model_uri=trained["model_path"], test_data=trained["test"], input="jpeg", image_root=trained["root"]
    )
    via_hdf5 = evaluate(model_uri=trained["model_path"], test_data=trained["test"], input="hdf5")
    jpeg_top1 = via_jpeg["predictions"].top_classes[:, 0]
    order = np.argsort(via_jpeg["predictions"].indices)
    np.testing.assert_array_equal(jpeg_top1[order], keras_top1)
    assert via_jpeg["metrics"]["test_top1"] == pytest.approx(float(np.mean(keras_top1 == labels)))
    assert via_jpeg["metrics"]["test_top1"] == via_hdf5["metrics"]["test_top1"]
    # The predictions differ between images, so the image-by-image comparison means something.
    assert len(set(keras_top1.tolist())) >= 2


def test_registered_model_is_linked_to_its_training_run_and_bad_inputs_are_one_line(trained, tmp_path, capsys):
    import mlflow

    import carclf_flavor
    from carclf_flavor.images import PreprocessSettings

    with mlflow.start_run() as training_run:
        carclf_flavor.log_model(
            trained["model"],
            "model",
            trained["class_names"],
            preprocessing=PreprocessSettings(image_size=SIZE),
            registered_model_name="carclf-eval",
        )
    result = evaluate(model_uri="models:/carclf-eval/1", test_data=trained["test"])
    run = mlflow.tracking.MlflowClient().get_run(result["run_id"])
    assert run.data.tags["carclf.model_source_run_id"] == training_run.info.run_id
    assert run.info.run_id != training_run.info.run_id

    # A test set with other classes, and a JPEG folder that is not there: one-line errors.
    from carclf.data.hdf5_dataset import write_hdf5_split

    other = write_hdf5_split(
        tmp_path / "other.h5",
        np.zeros((2, SIZE, SIZE, 3), np.uint8),
        [0, 1],
        ["x", "y"],
        PreprocessSettings(image_size=SIZE),
    )
    with pytest.raises(EvaluateError, match="classes differ"):
        evaluate(model_uri=trained["model_path"], test_data=str(other))
    assert (
        evaluate_module.main(
            [
                "--model-uri",
                trained["model_path"],
                "--test-data",
                trained["test"],
                "--input",
                "jpeg",
                "--image-root",
                str(tmp_path / "nowhere"),
            ]
        )
        == 2
    )
    assert evaluate_module.main(["--model-uri", "models:/carclf-eval/7", "--test-data", trained["test"]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "not found" in errors[0] and "carclf-eval" in errors[1]


def test_a_failure_inside_mlflow_runs_run_is_left_to_it_and_its_own_run_ends_failed(trained, tmp_path):
    """Under `mlflow run` the run belongs to the launcher (it sets the status from the exit code): evaluate
    records why it stopped and leaves the run open; a run evaluate started itself ends FAILED."""
    import mlflow

    client = mlflow.tracking.MlflowClient()
    nowhere = str(tmp_path / "nowhere")  # input=jpeg finds no photo there: EvaluateError inside the run
    with mlflow.start_run() as launcher:
        with pytest.raises(EvaluateError, match="not found"):
            evaluate(model_uri=trained["model_path"], test_data=trained["test"], input="jpeg", image_root=nowhere)
        assert mlflow.active_run() is not None and mlflow.active_run().info.run_id == launcher.info.run_id
        assert client.get_run(launcher.info.run_id).info.status == "RUNNING"
    assert client.get_run(launcher.info.run_id).info.status == "FINISHED"
    assert "not found" in client.get_run(launcher.info.run_id).data.tags["carclf.error"]

    with pytest.raises(EvaluateError, match="not found"):
        evaluate(model_uri=trained["model_path"], test_data=trained["test"], input="jpeg", image_root=nowhere)
    assert mlflow.active_run() is None
    (own,) = [r for r in client.search_runs([launcher.info.experiment_id]) if r.info.run_id != launcher.info.run_id]
    assert own.info.status == "FAILED"
    assert "EvaluateError" in own.data.tags["carclf.error"]
