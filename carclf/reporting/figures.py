"""Report pictures shared by every step: matplotlib figures, OpenCV image grids and SVG charts.

- ``plot_training_curves``, ``plot_confusion_matrix``: matplotlib figures (Agg backend, no display needed);
  ``log_figure`` logs one to the active run and closes it.
- ``image_grid(images, captions, cols)``: images tiled at their own pixels with text captions (sample crops,
  augmented variants, misclassified images), drawn with OpenCV: no matplotlib import or resampling;
  ``misclassified_grid`` the gallery of mistakes; ``log_png`` logs a picture as a PNG artifact.
- ``stacked_bar_svg(categories, series)``: a small bar chart written as SVG text (class counts).

Every input is a value (arrays, class names, counts): nothing here reads a data set.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

import numpy as np

# Tick labels are readable up to about this many classes; above it the axes show class indices only.
MAX_LABELLED_CLASSES = 40


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
