"""`preprocess` step: photos (Stanford Cars or a folder per class) -> train.h5, val.h5, test.h5.

Every photo goes through ``carclf_flavor.images.prepare_photo`` (one header read, JPEG decoded at reduced
scale where the crop allows, EXIF orientation, bbox crop with margin, stretch/pad resize): the very function
the served model applies to incoming photos, with the same bbox policy (see ``carclf_flavor.images``).
Decoding runs in worker processes; the parent is the single HDF5 writer (``carclf.data.preprocessing``).

A photo that cannot be used (zero bytes, corrupt, truncated, not an image, unreadable, with ``crop=bbox`` a
box that is empty, inverted or wholly outside the photo) is skipped, counted and named (log,
``skipped_images`` metric, ``skipped.txt`` artifact). A box partly outside its photo is clamped with a
warning; with ``crop=none`` boxes are ignored. All three files are written under temporary names and
renamed only when every split is complete: a failed or killed run leaves no file that looks finished.

Tracking (into the active MLflow run, or a run of its own): parameters, image counts per split, skipped and
clamped counts, throughput, a per-class count bar chart, a grid of sample crops and the output paths.

CLI: ``python -m entry_points.preprocess --data-dir DIR --output-dir data/processed --image-size 224 ...``;
an empty ``--data-dir`` uses the generated sample data (cached, see ``carclf.data.sample_data``). A script
calling ``preprocess()`` with workers != 1 needs the usual ``if __name__ == "__main__":`` guard (workers
start through a fork server).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
from collections.abc import Sequence

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import param, resolve_config, run_step
from carclf.data.hdf5_dataset import DatasetError
from carclf.data.preprocessing import SPLITS, cpu_count, log_params, log_results, plan_splits, write_splits
from carclf.data.readers import DataLayoutError, read_dataset
from carclf_flavor.images import CROP_MODES, RESIZE_MODES, PreprocessSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """The `preprocess` step's parameters (CLI flags, MLproject parameters and keyword arguments alike)."""

    data_dir: str = param("", "dataset root; empty = generated sample data (cached)")
    output_dir: str = param("data/processed", "folder for train.h5, val.h5 and test.h5")
    image_size: int = param(224, "side of the square images, in pixels")
    crop: str = param("bbox", "bbox: crop to the labelled box; none: the whole photo", choices=CROP_MODES)
    crop_margin: int = param(16, "pixels added around the box")
    resize_mode: str = param("stretch", "stretch or pad to the square", choices=RESIZE_MODES)
    val_fraction: float = param(0.1, "per class, taken from train")
    test_fraction: float = param(0.2, "per class; only for <root>/<class>/ folders")
    workers: int = param(0, "decode processes; 0 = all cores")
    seed: int = param(0, "split and shuffle seed")


def _validate(image_size, crop, crop_margin, resize_mode, val_fraction, test_fraction, workers) -> PreprocessSettings:
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if int(workers) < 0:
        raise ValueError(f"workers must be >= 0 (0 = all cores), got {workers}")
    return PreprocessSettings(
        image_size=int(image_size), crop=crop, crop_margin=int(crop_margin), resize_mode=resize_mode
    )


def preprocess(config: PreprocessConfig | None = None, **overrides) -> dict[str, pathlib.Path]:
    """Build ``train.h5``, ``val.h5`` and ``test.h5`` in ``output_dir``; returns their paths by split.

    ``data_dir`` empty (or None) = the generated sample data in the cache folder. ``workers`` 0 = all cores.
    Takes a ``PreprocessConfig`` or its fields as keywords (``preprocess(data_dir=..., output_dir=...)``).
    """
    c = resolve_config(PreprocessConfig, config, **overrides)
    data_dir, output_dir, image_size, crop, crop_margin = c.data_dir, c.output_dir, c.image_size, c.crop, c.crop_margin
    resize_mode, val_fraction, test_fraction, workers, seed = (
        c.resize_mode,
        c.val_fraction,
        c.test_fraction,
        c.workers,
        c.seed,
    )
    settings = _validate(image_size, crop, crop_margin, resize_mode, val_fraction, test_fraction, workers)
    workers = int(workers) or cpu_count()
    if data_dir in (None, ""):
        from carclf.data.sample_data import ensure_sample_data

        root = ensure_sample_data()
        source = "sample"
    else:
        root = pathlib.Path(data_dir).expanduser().resolve()
        source = "user"
    output_dir = pathlib.Path(output_dir).expanduser().resolve()
    dataset = read_dataset(root, test_fraction=float(test_fraction), seed=int(seed))
    plan = plan_splits(dataset, float(val_fraction), int(seed))
    total = sum(len(plan[s]) for s in SPLITS)
    log.info(
        "%s (%s layout): %d classes; %s; %d worker(s)",
        root,
        dataset.layout,
        len(dataset.class_names),
        ", ".join(f"{s} {len(plan[s])}" for s in SPLITS),
        workers,
    )
    from carclf.tracking.runs import step_run

    with step_run("preprocess"):
        log_params(
            {
                "data_dir": "" if data_dir is None else str(data_dir),
                "output_dir": str(output_dir),
                **settings.to_dict(),
                "val_fraction": float(val_fraction),
                "test_fraction": float(test_fraction),
                "workers": workers,
                "seed": int(seed),
                "resolved_data_dir": str(root),
                "data_source": source,
                "layout": dataset.layout,
            }
        )
        paths, labels, skipped, clamped, seconds = write_splits(plan, dataset, output_dir, settings, workers)
        log.info(
            "wrote %s; %d skipped, %d boxes clamped; %.0f img/s",
            ", ".join(f"{p} ({len(labels[s])})" for s, p in paths.items()),
            len(skipped),
            len(clamped),
            total / seconds if seconds else 0.0,
        )
        log_results(dataset, settings, paths, labels, skipped, clamped, seconds, total)
    return paths


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def _print_paths(paths: dict[str, pathlib.Path], config: PreprocessConfig) -> None:
    for split, path in paths.items():
        print(f"{split}: {path}")


def build_parser() -> argparse.ArgumentParser:
    return build_parser_for(
        PreprocessConfig,
        "python -m entry_points.preprocess",
        "Photos (Stanford Cars or folder per class) -> train/val/test HDF5.",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_step(
        preprocess,
        PreprocessConfig,
        "python -m entry_points.preprocess",
        "Photos (Stanford Cars or folder per class) -> train/val/test HDF5.",
        argv,
        expected_errors=(DataLayoutError, DatasetError, ValueError, OSError),
        print_result=_print_paths,
    )


if __name__ == "__main__":
    sys.exit(main())
