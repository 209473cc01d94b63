"""The augmentation as a plain single-process loop, no Spark: the benchmark's baseline and the reference the
Spark output must equal byte for byte (the same ``range_task.write_range`` over all rows at once)."""

from __future__ import annotations

import time

import h5py

from carclf.augmentation.job import prepare_job
from carclf.augmentation.range_task import write_range
from carclf.augmentation.transforms import DEFAULT_OPS, AugmentParams, use_single_threaded_opencv
from carclf.data.hdf5_dataset import HDF5SplitWriter


def augment_in_process(
    input, output, *, copies: int, keep_original: bool, seed: int, ops: str = DEFAULT_OPS, **strengths
) -> dict:
    """Augment ``input`` into ``output`` in this process; returns the output path, counts and timings."""
    params = AugmentParams.parse(ops, **strengths)
    job = prepare_job(input, output, copies=copies, keep_original=keep_original, params=params, seed=seed)
    info, spec = job.info, job.spec
    use_single_threaded_opencv()
    began, cpu_began = time.perf_counter(), time.process_time()
    total = info.num_images * spec.rows_per_source
    with (
        h5py.File(job.input_path, "r") as source,
        HDF5SplitWriter(
            job.output_path,
            info.class_names,
            info.settings,
            split=job.split,
            with_source_index=True,
            expected_rows=total,
            attrs=job.output_attrs("in-process"),
        ) as writer,
    ):
        write_range(spec, writer, source, 0, info.num_images)
    seconds = time.perf_counter() - began
    return {
        "output": str(job.output_path),
        "num_output_images": total,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_began,
        "images_per_second": total / seconds if seconds > 0 else 0.0,
    }
