"""Evaluation metrics shared by ``train`` (final test pass), ``tune``'s champion and ``evaluate``.

- ``collect_predictions(predict_fn, batches)``: run a model over (images, labels, indices) batches, keeping
  only labels and the top-k classes/probabilities of each image (never the images).
- ``classification_metrics(labels, top_classes, num_classes)``: top-1, top-5, macro F1, per-class accuracy,
  confusion matrix; ``per_class_table`` its CSV; ``worst_mistakes`` the most confident wrong predictions.
- ``format_table(metrics)``: the scalar metrics as a short text table.

Numbers only (numpy, pandas for the table): the pictures are ``carclf.reporting.figures``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

TOP_K = 5


@dataclasses.dataclass
class Predictions:
    labels: np.ndarray  # (N,) int32 true class
    top_classes: np.ndarray  # (N, k) int32, most likely first
    top_probs: np.ndarray  # (N, k) float32
    indices: np.ndarray  # (N,) int64 global row index in the source


def collect_predictions(
    predict_fn: Callable[[np.ndarray], np.ndarray], batches: Iterable[tuple], top_k: int = TOP_K
) -> Predictions:
    """Run ``predict_fn`` (uint8 batch -> (B, C) probabilities) over ``batches`` of (images, labels, global row
    indices), e.g. ``make_dataset(source, batch_size, shuffle=False, epochs=1, with_indices=True)
    .as_numpy_iterator()``, keeping only labels and the top-k classes/probabilities of each image."""
    labels, classes, probs, indices = [], [], [], []
    for images, batch_labels, batch_indices in batches:
        out = np.asarray(predict_fn(images), dtype=np.float32)
        k = min(top_k, out.shape[1])
        order = np.argsort(-out, axis=1, kind="stable")[:, :k]
        labels.append(batch_labels)
        classes.append(order.astype(np.int32))
        probs.append(np.take_along_axis(out, order, axis=1))
        indices.append(batch_indices)
    if not labels:
        raise ValueError("the test set has no images")
    return Predictions(np.concatenate(labels), np.concatenate(classes), np.concatenate(probs), np.concatenate(indices))


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return cm


def classification_metrics(labels: np.ndarray, top_classes: np.ndarray, num_classes: int) -> dict:
    """Top-1/top-5 accuracy, macro F1 (over classes that occur as truth or prediction), per-class numbers."""
    labels = np.asarray(labels, np.int64)
    top_classes = np.asarray(top_classes, np.int64).reshape(len(labels), -1)
    predicted = top_classes[:, 0]
    cm = confusion_matrix(labels, predicted, num_classes)
    support = cm.sum(axis=1)
    predicted_count = cm.sum(axis=0)
    correct = np.diag(cm)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, correct / np.maximum(support, 1), 0.0)
        precision = np.where(predicted_count > 0, correct / np.maximum(predicted_count, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    present = (support > 0) | (predicted_count > 0)
    k = min(TOP_K, top_classes.shape[1])
    return {
        "top1": float(np.mean(predicted == labels)),
        "top5": float(np.mean(np.any(top_classes[:, :k] == labels[:, None], axis=1))),
        "macro_f1": float(np.mean(f1[present])) if present.any() else 0.0,
        "num_images": int(len(labels)),
        "confusion_matrix": cm,
        "support": support,
        "per_class_accuracy": recall,
        "precision": precision,
        "f1": f1,
    }


def per_class_table(metrics: dict, class_names: Sequence[str]):
    import pandas as pd

    return pd.DataFrame(
        {
            "class_id": np.arange(len(class_names)),
            "class_name": list(class_names),
            "support": metrics["support"],
            "correct": np.diag(metrics["confusion_matrix"]),
            "accuracy": np.round(metrics["per_class_accuracy"], 6),
            "precision": np.round(metrics["precision"], 6),
            "f1": np.round(metrics["f1"], 6),
        }
    )


def worst_mistakes(predictions: Predictions, count: int = 16) -> np.ndarray:
    """Positions (into ``predictions``) of wrong predictions, most confident first."""
    wrong = np.flatnonzero(predictions.top_classes[:, 0] != predictions.labels)
    order = np.argsort(-predictions.top_probs[wrong, 0], kind="stable")
    return wrong[order[:count]]


def format_table(metrics: Mapping[str, float], prefix: str = "test_") -> str:
    """A short two-column text table of the scalar metrics."""
    lines = [f"{'metric':<16} {'value':>10}", f"{'-' * 16} {'-' * 10}"]
    for name in ("top1", "top5", "macro_f1", "num_images"):
        key = f"{prefix}{name}"
        if key in metrics:
            value = metrics[key]
            lines.append(f"{name:<16} {value:>10d}" if name == "num_images" else f"{name:<16} {value:>10.4f}")
    return "\n".join(lines)
