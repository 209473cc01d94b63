"""Evaluation metrics and report artifacts shared by ``train`` (final test pass) and ``evaluate``.

- ``collect_predictions(predict_fn, source, batch_size)``: stream an HDF5 source through a model, keeping
  only labels and the top-k classes/probabilities of each image (never the images).
- ``classification_metrics(labels, top_classes, num_classes)``: top-1, top-5, macro F1, per-class accuracy,
  confusion matrix.
- ``per_class_table``, ``plot_training_curves``, ``plot_confusion_matrix``, ``plot_gallery``: the CSV and PNGs.
- ``log_test_report(...)``: computes everything and logs metrics (``test_top1``, ``test_top5``,
  ``test_macro_f1``, ...) and artifacts to the active MLflow run; returns the metrics.

Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import dataclasses
import textwrap
from typing import Callable, Mapping, Sequence

import numpy as np

TOP_K = 5
# Tick labels are readable up to about this many classes; above it the axes show class indices only.
MAX_LABELLED_CLASSES = 40


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclasses.dataclass
class Predictions:
    labels: np.ndarray        # (N,) int32 true class
    top_classes: np.ndarray   # (N, k) int32, most likely first
    top_probs: np.ndarray     # (N, k) float32
    indices: np.ndarray       # (N,) int64 global row index in the source


def collect_predictions(predict_fn: Callable[[np.ndarray], np.ndarray], source, batch_size: int = 64,
                        top_k: int = TOP_K) -> Predictions:
    """Run ``predict_fn`` (uint8 batch -> (B, C) probabilities) over ``source`` in file order."""
    from entry_points.input_pipeline import make_dataset

    dataset = make_dataset(source, batch_size, shuffle=False, epochs=1, with_indices=True)
    labels, classes, probs, indices = [], [], [], []
    for images, batch_labels, batch_indices in dataset.as_numpy_iterator():
        out = np.asarray(predict_fn(images), dtype=np.float32)
        k = min(top_k, out.shape[1])
        order = np.argsort(-out, axis=1, kind="stable")[:, :k]
        labels.append(batch_labels)
        classes.append(order.astype(np.int32))
        probs.append(np.take_along_axis(out, order, axis=1))
        indices.append(batch_indices)
    if not labels:
        raise ValueError("the test set has no images")
    return Predictions(np.concatenate(labels), np.concatenate(classes), np.concatenate(probs),
                       np.concatenate(indices))


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

    return pd.DataFrame({
        "class_id": np.arange(len(class_names)),
        "class_name": list(class_names),
        "support": metrics["support"],
        "correct": np.diag(metrics["confusion_matrix"]),
        "accuracy": np.round(metrics["per_class_accuracy"], 6),
        "precision": np.round(metrics["precision"], 6),
        "f1": np.round(metrics["f1"], 6),
    })


def plot_training_curves(history: Mapping[str, Sequence[tuple[int, float]]]):
    """Loss, accuracy, top-5 and learning rate per epoch; ``history`` maps metric name -> [(epoch, value)]."""
    plt = _pyplot()
    panels = [("loss", ["loss", "val_loss"]), ("accuracy", ["accuracy", "val_accuracy"]),
              ("top-5 accuracy", ["top5", "val_top5"]), ("learning rate", ["learning_rate"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = sorted(history.get(key, []))
            if points:
                ax.plot([p[0] + 1 for p in points], [p[1] for p in points], marker="o", markersize=3,
                        label="val" if key.startswith("val_") else "train" if key != "learning_rate" else "lr")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        elif ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str]):
    """Row-normalised confusion matrix as an image, no per-cell text (readable at 196 classes)."""
    plt = _pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(class_names)
    side = 6.0 if n <= MAX_LABELLED_CLASSES else 10.0
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(normalised, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= MAX_LABELLED_CLASSES:
        short = [textwrap.shorten(str(c), width=28, placeholder="...") for c in class_names]
        ax.set_xticks(range(n), short, rotation=90, fontsize=6)
        ax.set_yticks(range(n), short, fontsize=6)
    ax.set_xlabel("predicted class" + ("" if n <= MAX_LABELLED_CLASSES else " (index)"))
    ax.set_ylabel("true class" + ("" if n <= MAX_LABELLED_CLASSES else " (index)"))
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"Confusion matrix, row-normalised ({n} classes, top-1 {accuracy:.1%})")
    fig.tight_layout()
    return fig


def worst_mistakes(predictions: Predictions, count: int = 16) -> np.ndarray:
    """Positions (into ``predictions``) of wrong predictions, most confident first."""
    wrong = np.flatnonzero(predictions.top_classes[:, 0] != predictions.labels)
    order = np.argsort(-predictions.top_probs[wrong, 0], kind="stable")
    return wrong[order[:count]]


def plot_gallery(images: np.ndarray, true_names: Sequence[str], predicted_names: Sequence[str],
                 probs: Sequence[float], title: str = "Worst misclassified test images"):
    """A grid of images, each titled with its true and (wrong) predicted label and the predicted probability."""
    plt = _pyplot()
    count = len(images)
    cols = min(4, max(1, count))
    rows = max(1, int(np.ceil(count / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, truth, guess, prob in zip(axes.ravel(), images, true_names, predicted_names, probs):
        ax.imshow(image)
        ax.set_title(
            f"true: {textwrap.shorten(str(truth), 34, placeholder='...')}\n"
            f"pred: {textwrap.shorten(str(guess), 34, placeholder='...')} ({prob:.0%})",
            fontsize=7, color="darkred",
        )
    if count == 0:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def log_test_report(predictions: Predictions, source, class_names: Sequence[str], prefix: str = "test_",
                    gallery_size: int = 16, artifact_dir: str = "evaluation") -> dict:
    """Log metrics ``<prefix>top1/top5/macro_f1`` and the CSV/PNG artifacts to the active run."""
    import mlflow

    plt = _pyplot()
    metrics = classification_metrics(predictions.labels, predictions.top_classes, len(class_names))
    scalar = {f"{prefix}{name}": metrics[name] for name in ("top1", "top5", "macro_f1")}
    scalar[f"{prefix}num_images"] = metrics["num_images"]
    mlflow.log_metrics(scalar)
    mlflow.log_text(per_class_table(metrics, class_names).to_csv(index=False),
                    f"{artifact_dir}/per_class_accuracy.csv")
    figure = plot_confusion_matrix(metrics["confusion_matrix"], class_names)
    mlflow.log_figure(figure, f"{artifact_dir}/confusion_matrix.png")
    plt.close(figure)
    worst = worst_mistakes(predictions, gallery_size)
    images, _ = source.read_rows(predictions.indices[worst]) if len(worst) else (np.zeros((0, 1, 1, 3), np.uint8), None)
    figure = plot_gallery(
        images,
        [class_names[c] for c in predictions.labels[worst]],
        [class_names[c] for c in predictions.top_classes[worst, 0]],
        predictions.top_probs[worst, 0],
    )
    mlflow.log_figure(figure, f"{artifact_dir}/misclassified_gallery.png")
    plt.close(figure)
    return dict(scalar, confusion_matrix=metrics["confusion_matrix"], per_class_accuracy=metrics["per_class_accuracy"])


def format_table(metrics: Mapping[str, float], prefix: str = "test_") -> str:
    """A short two-column text table of the scalar metrics."""
    lines = [f"{'metric':<16} {'value':>10}", f"{'-' * 16} {'-' * 10}"]
    for name in ("top1", "top5", "macro_f1", "num_images"):
        key = f"{prefix}{name}"
        if key in metrics:
            value = metrics[key]
            lines.append(f"{name:<16} {value:>10d}" if name == "num_images" else f"{name:<16} {value:>10.4f}")
    return "\n".join(lines)
