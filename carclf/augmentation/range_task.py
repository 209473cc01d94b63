"""One input row range: read, augment, write. The body of one Spark task, and of the plain in-process loop.

A task opens the input HDF5 itself and reads its range ``CHUNK`` rows at a time (memory bounded by one chunk,
not by the partition or the dataset). Its images go (``os.pwrite``) straight into their own rows of the output's
preallocated image block (``RowsIntoBlock``): written once, never copied or merged. Its rows' metadata becomes
the range's shard (``shards``). Output rows, per source image in input order: the original (``keep_original``),
then copies 1..``copies``.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable

import h5py
import numpy as np

from carclf.augmentation.errors import AugmentError
from carclf.augmentation.job import JobSpec
from carclf.augmentation.shards import shard_path, write_shard
from carclf.augmentation.transforms import augment_image, rng_for, use_single_threaded_opencv
from carclf.data.hdf5_dataset import HDF5SplitWriter

# Source images read, augmented and written at a time inside a task: bounds a task's memory
# (about CHUNK * (1 + copies) images) whatever the size of its partition.
CHUNK = 32
# Test hook for fault tolerance, read by the DRIVER and passed to the tasks: "once:<dir>" makes the
# first attempt of every task crash its Python worker halfway through its shard (a marker file in
# <dir> remembers the attempt); "always" makes every attempt fail.
FAIL_ENV = "CARCLF_AUGMENT_INJECT_FAILURE"


def _augment_chunk(spec: JobSpec, start: int, images, labels, filenames, bboxes):
    """Output rows for input rows start.. start+len(images): per source, original then copies 1..k."""
    out_images, out_labels, out_files, out_boxes, out_src = [], [], [], [], []
    for offset, image in enumerate(images):
        row = start + offset
        variants = [image] if spec.keep_original else []
        variants += [augment_image(image, spec.params, rng_for(spec.seed, row, c)) for c in range(1, spec.copies + 1)]
        out_images.extend(variants)
        out_labels.extend([labels[offset]] * len(variants))
        out_files.extend([filenames[offset]] * len(variants))
        out_boxes.extend([bboxes[offset]] * len(variants))
        out_src.extend(([-1] if spec.keep_original else []) + [row] * spec.copies)
    size = images.shape[1]
    stacked = np.stack(out_images) if out_images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, out_labels, out_files, np.asarray(out_boxes).reshape(-1, 4), out_src


def _read_strings(ds, start, stop):
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in ds[start:stop]]


def write_range(
    spec: JobSpec, writer: HDF5SplitWriter, source, start: int, stop: int, on_chunk: Callable[[int], None] | None = None
) -> int:
    """Augment input rows [start, stop) of the open file ``source`` into ``writer``; returns rows written."""
    written = 0
    for chunk_start in range(start, stop, CHUNK):
        chunk_stop = min(stop, chunk_start + CHUNK)
        rows = _augment_chunk(
            spec,
            chunk_start,
            source["images"][chunk_start:chunk_stop],
            source["labels"][chunk_start:chunk_stop],
            _read_strings(source["filenames"], chunk_start, chunk_stop),
            source["bboxes"][chunk_start:chunk_stop],
        )
        writer.append(*rows)
        written += len(rows[0])
        if on_chunk:
            on_chunk(chunk_stop)
    return written


class RowsIntoBlock:
    """A task's writer (same ``append`` as HDF5SplitWriter): images go straight into the output's
    preallocated block at their own rows, metadata is kept for the task's shard."""

    def __init__(self, spec: JobSpec, first_row: int):
        self.fd = os.open(spec.output_tmp, os.O_WRONLY)  # FileNotFoundError: the driver gave the job up
        self.row_bytes = spec.row_bytes
        self.position = spec.images_offset + first_row * spec.row_bytes
        self.labels, self.filenames, self.bboxes, self.source_index = [], [], [], []

    def append(self, images, labels, filenames, bboxes, source_index) -> None:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.size != len(images) * self.row_bytes:
            raise AugmentError(
                f"augmented images of shape {images.shape[1:]} do not fit rows of {self.row_bytes} bytes"
            )
        data = memoryview(images).cast("B")
        while data:  # pwrite may write less than asked
            written = os.pwrite(self.fd, data, self.position)
            data, self.position = data[written:], self.position + written
        self.labels.extend(int(v) for v in labels)
        self.filenames.extend(str(f) for f in filenames)
        self.bboxes.extend(np.asarray(bboxes, dtype=np.int32).reshape(-1, 4).tolist())
        self.source_index.extend(int(v) for v in source_index)

    def save_metadata(self, target: pathlib.Path) -> None:
        """The shard: metadata of every row written, under a temporary name renamed when complete."""
        write_shard(target, self.labels, self.filenames, self.bboxes, self.source_index)

    def close(self) -> None:
        os.close(self.fd)


def run_range(spec: JobSpec, start: int, stop: int) -> dict:
    """Body of one Spark task: input rows [start, stop) -> their rows of the output's image block, then
    the range's metadata shard; returns counts."""
    use_single_threaded_opencv()
    began, cpu_began = time.perf_counter(), time.process_time()
    shard_dir = pathlib.Path(spec.shard_dir)
    if not shard_dir.is_dir():
        # The driver removed it: the job was abandoned; do not recreate it behind the driver's back.
        raise AugmentError(f"shard folder {shard_dir} is gone (job cancelled)")
    crash_halfway = _injected_failure(spec.fail_mode, start, stop)
    halfway = start + max(1, (stop - start) // 2)

    def maybe_crash(done: int) -> None:
        if crash_halfway and done >= halfway:
            os._exit(17)  # a killed worker: no cleanup, half its rows written, no shard

    with h5py.File(spec.input, "r") as source:
        writer = RowsIntoBlock(spec, first_row=start * spec.rows_per_source)
        try:
            rows = write_range(spec, writer, source, start, stop, on_chunk=maybe_crash)
            writer.save_metadata(shard_path(shard_dir, start, stop))
        finally:
            writer.close()
    return {
        "start": start,
        "stop": stop,
        "rows": rows,
        "seconds": time.perf_counter() - began,
        "cpu_seconds": time.process_time() - cpu_began,
    }


def _injected_failure(mode: str, start: int, stop: int) -> bool:
    if not mode:
        return False
    if mode == "always":
        raise RuntimeError(f"injected failure in task for rows {start}..{stop} ({FAIL_ENV}=always)")
    if mode.startswith("once:"):
        marker = pathlib.Path(mode[len("once:") :]) / f"failed-{start}-{stop}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            return True
    return False
