"""Evaluation metrics and report artifacts: metrics shared by ``train`` (final test pass) and ``evaluate``,
pictures shared by every step.

- ``collect_predictions(predict_fn, source, batch_size)``: stream an HDF5 source through a model, keeping
  only labels and the top-k classes/probabilities of each image (never the images).
- ``classification_metrics(labels, top_classes, num_classes)``: top-1, top-5, macro F1, per-class accuracy,
  confusion matrix.
- ``per_class_table``, ``plot_training_curves``, ``plot_confusion_matrix``: the CSV and PNGs.
- ``image_grid(images, captions, cols)``: images tiled at their own pixels with text captions (sample crops,
  augmented variants, misclassified images), drawn with OpenCV: no matplotlib import or resampling.
- ``stacked_bar_svg(categories, series)``: a small bar chart written as SVG text (class counts).
- ``log_test_report(...)``: computes everything (the gallery of mistakes with heatmaps when given a
  ``heatmap_fn``) and logs metrics (``test_top1``, ``test_top5``,
  ``test_macro_f1``, ...) and artifacts to the active MLflow run; returns the metrics.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import dataclasses
import math
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from xml.sax.saxutils import escape

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
    labels: np.ndarray  # (N,) int32 true class
    top_classes: np.ndarray  # (N, k) int32, most likely first
    top_probs: np.ndarray  # (N, k) float32
    indices: np.ndarray  # (N,) int64 global row index in the source


def collect_predictions(
    predict_fn: Callable[[np.ndarray], np.ndarray], source, batch_size: int = 64, top_k: int = TOP_K
) -> Predictions:
    """Run ``predict_fn`` (uint8 batch -> (B, C) probabilities) over ``source`` in file order."""
    from carclf.data.input_pipeline import make_dataset

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


def plot_training_curves(history: Mapping[str, Sequence[tuple[int, float]]]):
    """Loss, accuracy, top-5 and learning rate per epoch; ``history`` maps metric name -> [(epoch, value)]."""
    plt = _pyplot()
    panels = [
        ("loss", ["loss", "val_loss"]),
        ("accuracy", ["accuracy", "val_accuracy"]),
        ("top-5 accuracy", ["top5", "val_top5"]),
        ("learning rate", ["learning_rate"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = sorted(history.get(key, []))
            if points:
                ax.plot(
                    [p[0] + 1 for p in points],
                    [p[1] for p in points],
                    marker="o",
                    markersize=3,
                    label="val" if key.startswith("val_") else "train" if key != "learning_rate" else "lr",
                )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        elif ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def log_figure(figure, artifact_file: str) -> None:
    """Log a matplotlib figure to the active run and close it (figures are not garbage-collected by pyplot)."""
    import mlflow

    mlflow.log_figure(figure, artifact_file)
    _pyplot().close(figure)


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


# Tiles smaller than this are enlarged by a whole factor with nearest-neighbour sampling: each source pixel
# becomes a block, so a grid shows exactly the pixels the network sees, large enough to judge by eye.
MIN_TILE_PX = 160
GRID_GAP_PX = 6
_FONT_SCALE = 0.4
_LINE_PX = 14
_TEXT_RGB = (20, 20, 20)
_WARN_RGB = (170, 0, 0)


def _fit_text(cv2, text: str, width: int) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels at the caption font."""
    if cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, _FONT_SCALE, 1)[0][0] <= width:
        return text
    while text and cv2.getTextSize(text + "...", cv2.FONT_HERSHEY_SIMPLEX, _FONT_SCALE, 1)[0][0] > width:
        text = text[:-1]
    return text + "..."


def image_grid(
    images: Sequence[np.ndarray | None],
    captions: Sequence[Sequence[str]],
    cols: int,
    title: str = "",
    caption_rgb: tuple = _TEXT_RGB,
) -> np.ndarray:
    """One RGB uint8 picture: ``images`` (uint8 HxWx3, None = empty cell) in a grid of ``cols`` columns, each
    with its caption lines underneath (in ``caption_rgb``), ``title`` on top."""
    import cv2

    shown = [im for im in images if im is not None]
    height = max([im.shape[0] for im in shown], default=32)
    width = max([im.shape[1] for im in shown], default=32)
    factor = max(1, math.ceil(MIN_TILE_PX / max(height, width)))
    tile_h, tile_w = height * factor, width * factor
    lines = max([len(c) for c in captions], default=0)
    cell_h, cell_w = tile_h + lines * _LINE_PX + GRID_GAP_PX, tile_w + GRID_GAP_PX
    cols = max(1, min(cols, len(images) or 1))
    rows = max(1, math.ceil(len(images) / cols))
    top = _LINE_PX + 10 if title else GRID_GAP_PX
    canvas = np.full((top + rows * cell_h, GRID_GAP_PX + cols * cell_w, 3), 255, np.uint8)
    if title:
        cv2.putText(
            canvas,
            _fit_text(cv2, title, canvas.shape[1] - 2 * GRID_GAP_PX),
            (GRID_GAP_PX, _LINE_PX),
            cv2.FONT_HERSHEY_SIMPLEX,
            _FONT_SCALE + 0.05,
            _TEXT_RGB,
            1,
            cv2.LINE_AA,
        )
    for i, image in enumerate(images):
        y, x = top + (i // cols) * cell_h, GRID_GAP_PX + (i % cols) * cell_w
        if image is not None:
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            enlarged = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
            canvas[y : y + enlarged.shape[0], x : x + enlarged.shape[1]] = enlarged
        for k, line in enumerate(captions[i] if i < len(captions) else ()):
            cv2.putText(
                canvas,
                _fit_text(cv2, str(line), tile_w),
                (x, y + tile_h + (k + 1) * _LINE_PX - 3),
                cv2.FONT_HERSHEY_SIMPLEX,
                _FONT_SCALE,
                caption_rgb,
                1,
                cv2.LINE_AA,
            )
    return canvas


def log_png(image: np.ndarray, artifact_file: str) -> None:
    """Log an RGB uint8 picture as a PNG artifact of the active run. Fast zlib level: a grid of photo crops
    barely compresses, and PIL's default level (what ``mlflow.log_image`` uses) spends ~0.3 s per grid."""
    import tempfile

    import cv2
    import mlflow

    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"cannot encode {artifact_file} as PNG")
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as handle:
            handle.write(data.tobytes())
        mlflow.log_artifact(path, artifact_path=folder or None)


_SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _nice_step(top: float) -> int:
    """A round tick step (1, 2, 5 x 10^k) giving at most about 6 ticks up to ``top``."""
    raw = max(1.0, top / 6)
    magnitude = 10 ** math.floor(math.log10(raw))
    return int(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw))


def stacked_bar_svg(
    categories: Sequence[str],
    series: Mapping[str, Sequence[int]],
    title: str,
    x_label: str = "class",
    y_label: str = "images",
) -> str:
    """A stacked bar chart as SVG text: one bar per category, one stacked segment per series. Each segment
    carries a ``<title>`` (category, series, count) that browsers show on hover, so even 196 classes can be
    read off. Categories are written under the bars up to MAX_LABELLED_CLASSES, indices above that."""
    n = len(categories)
    counts = np.array([np.asarray(v, dtype=np.int64) for v in series.values()]).reshape(len(series), n)
    peak = float(counts.sum(axis=0).max()) if n else 1.0
    step = _nice_step(peak)
    y_max = max(step, math.ceil(peak / step) * step)
    labelled = n <= MAX_LABELLED_CLASSES
    bar_w = 18 if labelled else max(2, min(12, 900 // max(n, 1)))
    # Labels written at -60 degrees reach ~65 px left of their bar and ~120 px down.
    left, right, top, bottom = (90, 150, 34, 160) if labelled else (60, 150, 34, 46)
    gap = 2 if bar_w >= 8 else 0
    plot_w, plot_h = max(n * bar_w, 200), 260
    width, height = left + plot_w + right, top + plot_h + bottom

    def y(value: float) -> float:
        return top + plot_h * (1 - value / y_max)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + plot_w / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for tick in range(0, int(y_max) + 1, step):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick}</text>')
    for i, category in enumerate(categories):
        x, base = left + i * bar_w, 0
        for k, name in enumerate(series):
            value = int(counts[k, i])
            if value:
                out.append(
                    f'<rect class="bar" x="{x + gap / 2}" y="{y(base + value):.2f}" width="{bar_w - gap}" '
                    f'height="{y(base) - y(base + value):.2f}" fill="{_SERIES_COLOURS[k % 5]}">'
                    f"<title>{escape(str(category))}: {escape(name)} {value}</title></rect>"
                )
            base += value
        if labelled or i % 10 == 0:
            text = escape(str(category)[:24] if labelled else str(i))
            lx, ly = x + bar_w / 2, top + plot_h + 12
            anchor = f'text-anchor="end" transform="rotate(-60 {lx} {ly})"' if labelled else 'text-anchor="middle"'
            out.append(f'<text x="{lx}" y="{ly}" {anchor}>{text}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="black"/>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="black"/>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(
        f'<text transform="rotate(-90 16 {top + plot_h / 2})" x="16" y="{top + plot_h / 2}" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    for k, name in enumerate(series):
        ly = top + 10 + 18 * k
        out.append(
            f'<rect x="{left + plot_w + 14}" y="{ly - 9}" width="12" height="12" fill="{_SERIES_COLOURS[k % 5]}"/>'
        )
        out.append(f'<text x="{left + plot_w + 32}" y="{ly + 1}">{escape(name)} ({int(counts[k].sum())})</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def misclassified_grid(
    images: np.ndarray,
    true_names: Sequence[str],
    predicted_names: Sequence[str],
    probs: Sequence[float],
    title: str = "Worst misclassified test images",
    heatmaps: np.ndarray | None = None,
) -> np.ndarray:
    """The most confident mistakes, each captioned with its true and (wrong) predicted label and probability.
    ``heatmaps`` (N, H, W) in [0, 1]: each image is shown again to its right with the heatmap on top (the
    Grad-CAM of the wrong guess: what made the network say it)."""
    if len(images) == 0:
        return image_grid([None], [["no misclassified images"]], cols=1, title=title)
    tiles = list(images)
    if heatmaps is not None:
        from carclf.reporting.gradcam import overlay_heatmap

        gap = np.full((images.shape[1], 2, 3), 255, np.uint8)
        tiles = [np.hstack([image, gap, overlay_heatmap(image, heat)]) for image, heat in zip(images, heatmaps)]
        title = f"{title} (right: where the network looked for its guess, red = most)"
    # The probability leads: long class names are cut at the tile's edge.
    captions = [
        [f"true: {truth}", f"pred {prob:.0%}: {guess}"]
        for truth, guess, prob in zip(true_names, predicted_names, probs)
    ]
    return image_grid(tiles, captions, cols=4, title=title, caption_rgb=_WARN_RGB)


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

    plt = _pyplot()
    metrics = classification_metrics(predictions.labels, predictions.top_classes, len(class_names))
    scalar = {f"{prefix}{name}": metrics[name] for name in ("top1", "top5", "macro_f1")}
    scalar[f"{prefix}num_images"] = metrics["num_images"]
    mlflow.log_metrics(scalar)
    mlflow.log_text(per_class_table(metrics, class_names).to_csv(index=False), f"{artifact_dir}/per_class_accuracy.csv")
    figure = plot_confusion_matrix(metrics["confusion_matrix"], class_names)
    mlflow.log_figure(figure, f"{artifact_dir}/confusion_matrix.png")
    plt.close(figure)
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


def format_table(metrics: Mapping[str, float], prefix: str = "test_") -> str:
    """A short two-column text table of the scalar metrics."""
    lines = [f"{'metric':<16} {'value':>10}", f"{'-' * 16} {'-' * 10}"]
    for name in ("top1", "top5", "macro_f1", "num_images"):
        key = f"{prefix}{name}"
        if key in metrics:
            value = metrics[key]
            lines.append(f"{name:<16} {value:>10d}" if name == "num_images" else f"{name:<16} {value:>10.4f}")
    return "\n".join(lines)
