"""What an augmentation run logs to MLflow: its parameters, counts and timings, and a picture of originals beside
their augmented copies (``augment_samples.png``)."""

from __future__ import annotations

import h5py
import numpy as np

from carclf.augmentation.job import AugmentJob
from carclf.tracking.runs import log_new_params, step_run

# The summary's numbers logged as metrics.
METRICS = (
    "num_source_images",
    "num_output_images",
    "num_augmented",
    "num_originals",
    "seconds",
    "seconds_spark_job",
    "seconds_merge",
    "seconds_spark_startup",
    "images_per_second",
    "task_seconds",
    "task_cpu_seconds",
    "merge_cpu_seconds",
)


def log_augment_run(summary: dict, job: AugmentJob) -> None:
    """Log into the active MLflow run (or a run of its own): parameters, metrics and the sample grid."""
    import mlflow

    spec, input_path, output_path = job.spec, job.input_path, job.output_path
    with step_run("augment"):
        log_new_params(
            {
                "input": str(input_path),
                "output": str(output_path),
                "copies": spec.copies,
                "keep_original": spec.keep_original,
                "seed": spec.seed,
                "spark_master": summary["spark_master"],
                "partitions": summary["partitions"],
                **spec.params.to_dict(),
            }
        )
        mlflow.log_metrics({k: float(summary[k]) for k in METRICS})
        grid = sample_grid(input_path, output_path, spec.copies)
        if grid is not None:
            from carclf.reporting.figures import log_png

            log_png(grid, "augment_samples.png")


def sample_grid(input_path, output_path, copies: int, rows: int = 6, max_copies: int = 5) -> np.ndarray | None:
    """A picture: each row one source image (original) beside its first augmented variants."""
    if copies == 0:
        return None
    from carclf.reporting.figures import image_grid

    with h5py.File(input_path, "r") as src, h5py.File(output_path, "r") as out:
        n = src["images"].shape[0]
        if n == 0:
            return None
        picks = sorted(set(np.linspace(0, n - 1, min(rows, n)).round().astype(int).tolist()))
        source_index = out["source_index"][()]
        shown = min(copies, max_copies)
        images, captions = [], []
        for row in picks:
            variants = np.flatnonzero(source_index == row)[:shown]
            cells = [(src["images"][row], f"original #{row}")]
            cells += [(out["images"][int(v)], f"copy {k + 1}") for k, v in enumerate(variants)]
            cells += [(None, "")] * (1 + shown - len(cells))
            images += [image for image, _ in cells]
            captions += [[caption] for _, caption in cells]
    return image_grid(images, captions, cols=1 + shown, title="Originals and their augmented copies")
