"""What a finished training logs to its run: the training curves, the test report and the model (with int8).

Shared by the single-process loop (``carclf.training.run``) and the multi-worker chief
(``carclf.training.multi_worker_process``), so both runs look the same.
"""

from __future__ import annotations

import numpy as np

from carclf.data.input_pipeline import HDF5Source
from carclf.training.calibration import CALIBRATION_IMAGES, stratified_sample

CURVE_METRICS = ("loss", "val_loss", "accuracy", "val_accuracy", "top5", "val_top5", "learning_rate")


def log_training_curves(run_id: str) -> None:
    """``plots/training_curves.png`` from the run's own per-epoch metric histories."""
    import mlflow

    from carclf.reporting.figures import log_figure, plot_training_curves

    client = mlflow.tracking.MlflowClient()
    history = {}
    for key in CURVE_METRICS:
        history[key] = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    log_figure(plot_training_curves(history), "plots/training_curves.png")


def evaluate_on_test(model, test_source: HDF5Source, batch_size: int) -> dict:
    """The test report (metrics ``test_*``, confusion matrix, per-class accuracy, gallery); printed too."""
    import tensorflow as tf

    from carclf.data.input_pipeline import make_dataset
    from carclf.reporting.metrics import collect_predictions, format_table
    from carclf.reporting.test_report import log_test_report

    forward = tf.function(lambda images: tf.cast(model(images, training=False), tf.float32))
    batches = make_dataset(test_source, batch_size, shuffle=False, epochs=1, with_indices=True).as_numpy_iterator()
    predictions = collect_predictions(lambda images: forward(images).numpy(), batches)
    metrics = log_test_report(predictions, test_source, list(test_source.class_names))
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(format_table(scalars))
    return scalars


def log_final_model(model, config, train_source: HDF5Source, val_source: HDF5Source) -> dict:
    """The model as ``model`` (carclf flavor), registered as ``config.registered_model_name`` when set."""
    import mlflow

    import carclf_flavor

    # int8: quantized on a few hundred training images, shipped only if it holds up on validation.
    info = carclf_flavor.log_model(
        model,
        "model",
        list(train_source.class_names),
        preprocessing=train_source.settings,
        registered_model_name=config.registered_model_name or None,
        calibration_data=stratified_sample(train_source, CALIBRATION_IMAGES),
        validation_data=val_source.read_rows(np.arange(val_source.num_images)),
    )
    version = getattr(info, "registered_model_version", None)
    mlflow.set_tag("carclf.model_uri", info.model_uri)
    return {
        "model_uri": info.model_uri,
        "run_model_uri": f"runs:/{mlflow.active_run().info.run_id}/model",
        "registered_version": str(version) if version is not None else None,
    }
