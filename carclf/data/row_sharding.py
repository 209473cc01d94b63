"""Which HDF5 rows each of N training workers reads: every row exactly once per epoch across the workers.

Every worker computes the same epoch order (``input_pipeline.epoch_order``: seeded by (seed, epoch), the
order one process would read) and cuts it into global batches of ``global_batch`` rows; global batch k is
split into N contiguous pieces, piece w going to worker w. So the N workers together take exactly the
global batches one process would take, step by step, and the all-reduced step is the one-process step.
The last, short global batch is split as evenly as possible (a worker may get no row of it; it still runs
the step, so the collectives stay in step).

``worker_batches`` reads only the worker's own rows: per step one sorted, fancy-indexed h5py read per file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import h5py
import numpy as np

from carclf.data.input_pipeline import DEFAULT_BLOCK_SIZE, DEFAULT_WINDOW_BLOCKS, HDF5Source, epoch_order


def shard_bounds(batch_rows: int, num_workers: int) -> np.ndarray:
    """(N + 1) offsets cutting one global batch of ``batch_rows`` rows into N near-equal contiguous pieces."""
    return np.array([(batch_rows * w) // num_workers for w in range(num_workers + 1)], dtype=np.int64)


def worker_steps(
    rows_per_file: Sequence[int],
    epoch: int,
    seed: int,
    global_batch: int,
    worker: int,
    num_workers: int,
    shuffle: bool = True,
) -> list[tuple[np.ndarray, int]]:
    """For one epoch: per step, (global row indices this worker reads, rows in the whole global batch)."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} out of range for {num_workers} workers")
    order = epoch_order(rows_per_file, epoch, seed, DEFAULT_BLOCK_SIZE, DEFAULT_WINDOW_BLOCKS, shuffle)
    steps = []
    for start in range(0, len(order), global_batch):
        batch = order[start : start + global_batch]
        bounds = shard_bounds(len(batch), num_workers)
        steps.append((batch[bounds[worker] : bounds[worker + 1]], len(batch)))
    return steps


def read_global_rows(source: HDF5Source, files: list, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of ``rows`` (global indices, any order), reading only those rows."""
    size = source.image_size
    images = np.zeros((len(rows), size, size, 3), np.uint8)
    labels = np.zeros(len(rows), np.int32)
    offsets = np.cumsum([0] + source.rows_per_file)
    for index, handle in enumerate(files):
        mask = (rows >= offsets[index]) & (rows < offsets[index + 1])
        if not mask.any():
            continue
        local = rows[mask] - offsets[index]
        order = np.argsort(local)
        target = np.flatnonzero(mask)[order]
        images[target] = handle["images"][local[order].tolist()]  # h5py wants increasing indices
        labels[target] = handle["labels"][local[order].tolist()]
    return images, labels


def worker_batches(
    source: HDF5Source, epoch: int, seed: int, global_batch: int, worker: int, num_workers: int, shuffle: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """Yield (images, labels, global row indices, rows in the global batch) for this worker, one per step."""
    files = [h5py.File(path, "r") for path in source.paths]
    try:
        for rows, global_rows in worker_steps(
            source.rows_per_file, epoch, seed, global_batch, worker, num_workers, shuffle
        ):
            images, labels = read_global_rows(source, files, rows)
            yield images, labels, rows, global_rows
    finally:
        for handle in files:
            handle.close()
