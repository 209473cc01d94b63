"""The test report of a model: its metrics and pictures, logged to the active MLflow run.

``log_test_report(predictions, source, class_names, ...)`` logs metrics (``test_top1``, ``test_top5``,
``test_macro_f1``, ...), the per-class CSV, the confusion matrix and the gallery of mistakes (with heatmaps
when given a ``heatmap_fn``); returns the metrics. ``source`` is anything with ``read_rows(indices) ->
(images, labels)`` (an ``HDF5Source``): only the gallery's few images are read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from carclf.reporting.figures import log_figure, log_png, misclassified_grid, plot_confusion_matrix
from carclf.reporting.metrics import Predictions, classification_metrics, per_class_table, worst_mistakes


def log_test_report(
    predictions: Predictions,
    source,
    class_names: Sequence[str],
    prefix: str = "test_",
    gallery_size: int = 16,
    artifact_dir: str = "evaluation",
    heatmap_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Log metrics ``<prefix>top1/top5/macro_f1`` and the CSV/PNG artifacts to the active run.
    ``heatmap_fn(images, class_ids) -> (N, H, W)`` (e.g. ``carclf.reporting.gradcam.GradCAM``) adds a heatmap
    overlay of the predicted class to each image of the gallery of mistakes."""
    import mlflow

    metrics = classification_metrics(predictions.labels, predictions.top_classes, len(class_names))
    scalar = {f"{prefix}{name}": metrics[name] for name in ("top1", "top5", "macro_f1")}
    scalar[f"{prefix}num_images"] = metrics["num_images"]
    mlflow.log_metrics(scalar)
    mlflow.log_text(per_class_table(metrics, class_names).to_csv(index=False), f"{artifact_dir}/per_class_accuracy.csv")
    log_figure(plot_confusion_matrix(metrics["confusion_matrix"], class_names), f"{artifact_dir}/confusion_matrix.png")
    worst = worst_mistakes(predictions, gallery_size)
    images, _ = source.read_rows(predictions.indices[worst]) if len(worst) else (np.zeros((0, 1, 1, 3), np.uint8), None)
    gallery = misclassified_grid(
        images,
        [class_names[c] for c in predictions.labels[worst]],
        [class_names[c] for c in predictions.top_classes[worst, 0]],
        predictions.top_probs[worst, 0],
        heatmaps=heatmap_fn(images, predictions.top_classes[worst, 0])
        if heatmap_fn is not None and len(worst)
        else None,
    )
    log_png(gallery, f"{artifact_dir}/misclassified_gallery.png")
    return dict(scalar, confusion_matrix=metrics["confusion_matrix"], per_class_accuracy=metrics["per_class_accuracy"])
