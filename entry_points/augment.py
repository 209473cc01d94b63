"""`augment`: image augmentation of an HDF5 split, scaled out on Spark through pyspark.pandas (Koalas' successor).

``python -m entry_points.augment --input train.h5 --output train_aug.h5 --copies 2 --ops crop,pad,flip``

Writes ``output``: per source image in input order, the original (``keep_original``), then ``copies``
augmented variants made by ``ops`` applied in the given order; labels, file names and boxes follow their source,
and ``source_index`` is the input row of an augmented image (-1 for an original). The output appears only when
complete (a failed or killed run leaves nothing behind), and it is byte-identical whatever the master, the number
of partitions or the task retries: the randomness depends on (seed, source row, copy number) only.
Runs on the active Spark session (Databricks) or starts one on ``spark_master``; the work itself lives in
``carclf.augmentation`` (how it is spread over Spark: ``carclf.augmentation.spark_job``).
"""

import argparse
import dataclasses
import json
import logging
import sys

from carclf.augmentation.errors import AugmentError
from carclf.augmentation.job import prepare_job
from carclf.augmentation.reports import log_augment_run
from carclf.augmentation.spark_job import augment_on_spark
from carclf.augmentation.transforms import DEFAULT_OPS, OPS, STRENGTHS, AugmentParams
from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import param, resolve_config, run_step
from carclf.compute.spark_session import SparkSetupError
from carclf.data.hdf5_dataset import DatasetError
from carclf.files.atomic import OutputWriteError

_STRENGTHS = AugmentParams()  # the op strengths' defaults live in AugmentParams


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The `augment` step's parameters (CLI flags, MLproject parameters and keyword arguments alike).

    ``input``/``output`` default to the files ``preprocess`` writes by default, on the CLI as in MLproject:
    one rule, the declaration's default applies everywhere.
    """

    input: str = param("data/processed/train.h5", "HDF5 split to augment", mlproject_type="path")
    output: str = param("data/processed/train_aug.h5", "HDF5 file to write")
    copies: int = param(2, "augmented variants per image")
    keep_original: bool = param(True, "also write the original images")
    ops: str = param(DEFAULT_OPS, f"comma list, applied in order, from: {','.join(OPS)}")
    crop_scale: float = param(_STRENGTHS.crop_scale, "crop: random square of side U(crop_scale, 1) * S")
    pad_fraction: float = param(_STRENGTHS.pad_fraction, "pad: pad by pad_fraction * S and crop back")
    flip_prob: float = param(_STRENGTHS.flip_prob, "flip: horizontal mirror with this probability")
    rotate_degrees: float = param(_STRENGTHS.rotate_degrees, "rotate: angle U(-d, d)")
    brightness: float = param(_STRENGTHS.brightness, "brightness: add U(-b, b) * 255")
    contrast: float = param(_STRENGTHS.contrast, "contrast: scale around the mean by U(1 - c, 1 + c)")
    hue_degrees: float = param(_STRENGTHS.hue_degrees, "hue: rotate the hue by U(-h, h) degrees")
    blur_sigma: float = param(_STRENGTHS.blur_sigma, "blur: Gaussian, sigma U(0.1, blur_sigma)")
    cutout_fraction: float = param(_STRENGTHS.cutout_fraction, "cutout: one grey square of side fraction * S")
    spark_master: str = param(
        "local[*]",
        "Spark master URL (local[N], local[N,maxFailures], spark://host:7077, "
        "...); an active session (Databricks) is used as is",
    )
    partitions: int = param(0, "Spark tasks; 0 = automatic")
    seed: int = param(0, "augmentation seed (per source row and copy)")
    log_to_mlflow: bool = param(True, "log parameters, counts and a sample grid", cli=False, mlproject=False)


def augment(config: AugmentConfig | None = None, **overrides) -> dict:
    """Augment ``input`` on Spark into ``output``; returns counts, timings and the output path.

    Logs to the active MLflow run (or starts one): parameters, counts, throughput and a PNG grid of
    originals beside their augmented variants. Takes an ``AugmentConfig`` or its fields as keywords.
    """
    c = resolve_config(AugmentConfig, config, **overrides)
    params = AugmentParams.parse(c.ops, **{name: getattr(c, name) for name in STRENGTHS})
    # Every parameter checked and the input opened (DatasetError for a missing or malformed file) before Spark starts.
    job = prepare_job(
        c.input,
        c.output,
        copies=c.copies,
        keep_original=c.keep_original,
        params=params,
        seed=c.seed,
        partitions=c.partitions,
    )
    summary = augment_on_spark(job, c.spark_master)
    if c.log_to_mlflow:
        log_augment_run(summary, job)
    return summary


_PROG = "python -m entry_points.augment"


def build_parser() -> argparse.ArgumentParser:
    return build_parser_for(AugmentConfig, _PROG, __doc__.splitlines()[0])


def _print_summary(summary: dict, config: AugmentConfig) -> None:
    print(
        json.dumps({k: summary[k] for k in ("output", "num_source_images", "num_output_images", "images_per_second")})
    )


def main(argv=None) -> int:
    logging.getLogger("py4j").setLevel(logging.WARNING)  # one INFO line per Py4J connection otherwise
    return run_step(
        augment,
        AugmentConfig,
        _PROG,
        __doc__.splitlines()[0],
        argv,
        expected_errors=(AugmentError, DatasetError, SparkSetupError, OutputWriteError),
        print_result=_print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
