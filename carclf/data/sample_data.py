"""Generated sample data in the exact on-disk layout of Stanford Cars (the pipeline's default input).

Layout written by ``generate_sample_dataset(root, ...)`` (the same files the real download has)::

    root/cars_train/00001.jpg ...            training photos
    root/cars_test/00001.jpg ...             test photos (same numbering, another folder)
    root/devkit/cars_meta.mat                class_names: 1 x C cell of strings
    root/devkit/cars_train_annos.mat         annotations: 1 x N struct (bbox_x1, bbox_y1, bbox_x2, bbox_y2,
                                             class (1-based), fname)
    root/cars_test_annos_withlabels.mat      the same fields for the test photos

Boxes follow the MATLAB convention of the original devkit: 1-based, inclusive pixel coordinates.

Each photo is a JPEG of one drawn vehicle on a cluttered background, its class carried by its silhouette only
(drawn by ``carclf.data.sample_photos``). Everything derives from ``seed``: the same call writes byte-identical
files.

``ensure_sample_data(...)`` keeps one generated copy per parameter set in a cache folder
(``$CARCLF_CACHE_DIR`` or ``$XDG_CACHE_HOME/carclf`` or ``~/.cache/carclf``), generated once and moved into
place atomically; ``preprocess`` uses it when ``data_dir`` is empty.

CLI: ``python -m carclf.data.sample_data --output DIR [--num-classes 10 --train-per-class 24 ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import pathlib
import shutil
import sys
from collections.abc import Sequence

import cv2
import numpy as np
import scipy.io

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import param, run_step
from carclf.data.sample_photos import check_num_classes, class_names, draw_vehicle, render_photo
from carclf.files.atomic import partial_path, remove_stale_partials

# The photos' drawing lives in sample_photos; these names stay importable from here, the sample data's public face.
__all__ = [
    "DEFAULTS",
    "SampleDataConfig",
    "class_names",
    "default_sample_dir",
    "draw_vehicle",
    "ensure_sample_data",
    "generate_sample_dataset",
    "render_photo",
    "write_annotations",
    "write_class_meta",
]

log = logging.getLogger(__name__)

# Bump when the generator's output changes, so stale cached copies are not reused.
SAMPLE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SampleDataConfig:
    """The sample-data CLI's parameters; its defaults are also the cached sample's (``DEFAULTS``)."""

    output: str = param(help="folder to write (cars_train/, cars_test/, devkit/, ...)")
    num_classes: int = param(10, "car models to draw")
    train_per_class: int = param(48, "training photos per class")
    test_per_class: int = param(16, "test photos per class")
    seed: int = param(0, "drawing seed")
    min_width: int = param(300, "narrowest photo, in pixels")
    max_width: int = param(900, "widest photo, in pixels")


DEFAULTS = {f.name: f.default for f in dataclasses.fields(SampleDataConfig) if f.name != "output"}
_COMPLETE_MARKER = ".complete"


def _encode_jpeg(image_rgb: np.ndarray, quality: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return encoded.tobytes()


# ----------------------------------------------------------------------------------------------------------
# Stanford Cars files
# ----------------------------------------------------------------------------------------------------------
def _annotation_struct(rows: Sequence[dict]) -> np.ndarray:
    """A 1 x N MATLAB struct array with the devkit's fields and element types."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    struct = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for field in fields[:4]:
            struct[0, i][field] = np.array([[row[field]]], dtype=np.uint16)
        struct[0, i]["class"] = np.array([[row["class"]]], dtype=np.uint8 if row["class"] < 256 else np.uint16)
        struct[0, i]["fname"] = np.array([row["fname"]])
    return struct


def _savemat(path: os.PathLike | str, variables: dict) -> None:
    """``scipy.io.savemat`` with a fixed header text: scipy stamps the creation time into the 116-byte
    descriptive header, which would make two identical datasets differ."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables, do_compression=False)
    data = bytearray(buffer.getvalue())
    header = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: carclf sample generator"
    data[:116] = header.ljust(116, b" ")
    pathlib.Path(path).write_bytes(bytes(data))


def write_class_meta(path: os.PathLike | str, names: Sequence[str]) -> None:
    cell = np.empty((1, len(names)), dtype=object)
    for i, name in enumerate(names):
        cell[0, i] = np.array([name])
    _savemat(path, {"class_names": cell})


def write_annotations(path: os.PathLike | str, rows: Sequence[dict]) -> None:
    """rows: dicts with bbox_x1..bbox_y2 (1-based inclusive), class (1-based) and fname."""
    _savemat(path, {"annotations": _annotation_struct(rows)})


def _split_labels(rng: np.random.Generator, num_classes: int, per_class: int) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)  # the real set is not ordered by class either
    return labels


def generate_sample_dataset(
    root: os.PathLike | str,
    num_classes: int = DEFAULTS["num_classes"],
    train_per_class: int = DEFAULTS["train_per_class"],
    test_per_class: int = DEFAULTS["test_per_class"],
    seed: int = DEFAULTS["seed"],
    min_width: int = DEFAULTS["min_width"],
    max_width: int = DEFAULTS["max_width"],
) -> pathlib.Path:
    """Write a Stanford-Cars-layout sample dataset under ``root`` (created if needed); returns ``root``."""
    check_num_classes(num_classes)
    if int(train_per_class) < 1 or int(test_per_class) < 0:
        raise ValueError(
            f"train_per_class must be >= 1 and test_per_class >= 0, got {train_per_class} and {test_per_class}"
        )
    if not 64 <= int(min_width) <= int(max_width):
        raise ValueError(f"need 64 <= min_width <= max_width, got min_width={min_width}, max_width={max_width}")
    root = pathlib.Path(root)
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    names = class_names(num_classes)
    write_class_meta(root / "devkit" / "cars_meta.mat", names)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    for split_id, (split, per_class, annos) in enumerate(
        (
            ("cars_train", train_per_class, root / "devkit" / "cars_train_annos.mat"),
            ("cars_test", test_per_class, root / "cars_test_annos_withlabels.mat"),
        )
    ):
        folder = root / split
        folder.mkdir(exist_ok=True)
        labels = _split_labels(np.random.default_rng([seed, split_id, 1_000_003]), num_classes, per_class)
        rows = []
        indices = range(len(labels))
        if tqdm is not None:
            indices = tqdm(indices, desc=f"sample {split}", unit="img", leave=False, mininterval=1.0, disable=None)
        for i in indices:
            rng = np.random.default_rng([seed, split_id, i])
            label = int(labels[i])
            image, (x1, y1, x2, y2) = render_photo(label, rng, int(min_width), int(max_width))
            fname = f"{i + 1:05d}.jpg"
            (folder / fname).write_bytes(_encode_jpeg(image, int(rng.integers(80, 96))))
            # Devkit convention: 1-based inclusive coordinates.
            rows.append(
                {"bbox_x1": x1 + 1, "bbox_y1": y1 + 1, "bbox_x2": x2, "bbox_y2": y2, "class": label + 1, "fname": fname}
            )
        write_annotations(annos, rows)
    return root


# ----------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------
def cache_root() -> pathlib.Path:
    if os.environ.get("CARCLF_CACHE_DIR"):
        return pathlib.Path(os.environ["CARCLF_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "carclf"


def default_sample_dir(
    num_classes: int = DEFAULTS["num_classes"],
    train_per_class: int = DEFAULTS["train_per_class"],
    test_per_class: int = DEFAULTS["test_per_class"],
    seed: int = DEFAULTS["seed"],
    min_width: int = DEFAULTS["min_width"],
    max_width: int = DEFAULTS["max_width"],
) -> pathlib.Path:
    """Where the cached sample dataset with these parameters lives (it may not exist yet)."""
    name = (
        f"sample-v{SAMPLE_VERSION}-c{int(num_classes)}-train{int(train_per_class)}-test{int(test_per_class)}"
        f"-seed{int(seed)}-w{int(min_width)}-{int(max_width)}"
    )
    return cache_root() / name


def ensure_sample_data(**params) -> pathlib.Path:
    """The cached sample dataset, generated on first use into a partial folder and renamed into place."""
    params = {**DEFAULTS, **params}
    target = default_sample_dir(**params)
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # an incomplete leftover (should not happen with the rename, but be safe)
        shutil.rmtree(target, ignore_errors=True)
    remove_stale_partials(target.parent, log)  # what a killed generation left behind
    log.info("generating sample data (%s) into %s", params, target)
    # Not atomic_output: that would replace a copy another process has just completed (and may be reading).
    tmp = partial_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate_sample_dataset(tmp, **params)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first: use its copy.
            if not (target / _COMPLETE_MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
_PROG = "python -m carclf.data.sample_data"
_DESCRIPTION = "Write a sample dataset in the Stanford Cars layout."


def build_parser() -> argparse.ArgumentParser:
    return build_parser_for(SampleDataConfig, _PROG, _DESCRIPTION)


def _generate(config: SampleDataConfig) -> pathlib.Path:
    return generate_sample_dataset(config.output, **{name: getattr(config, name) for name in DEFAULTS})


def _print_root(root: pathlib.Path, config: SampleDataConfig) -> None:
    total = config.num_classes * (config.train_per_class + config.test_per_class)
    print(f"wrote {total} photos of {config.num_classes} classes to {root}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_step(
        _generate,
        SampleDataConfig,
        _PROG,
        _DESCRIPTION,
        argv,
        expected_errors=(ValueError, OSError),
        print_result=_print_root,
    )


if __name__ == "__main__":
    sys.exit(main())
