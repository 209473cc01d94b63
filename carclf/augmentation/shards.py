"""The metadata shards: one small ``.npz`` per input row range, written by its task, checked and merged by the driver.

A shard holds the labels, file names, boxes and source_index of every output row its range made (the pixels go
straight into the output's image block). It is keyed by the range, never by the attempt, and written under a
partial name renamed when complete: its presence marks the range as done, and a retried or speculative attempt
replaces it with the same bytes.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from carclf.augmentation.errors import AugmentError
from carclf.augmentation.job import JobSpec
from carclf.data.hdf5_dataset import HDF5SplitWriter
from carclf.files.atomic import atomic_output

SHARD_FIELDS = ("labels", "filenames", "bboxes", "source_index")


def shard_path(shard_dir: str | os.PathLike, start: int, stop: int) -> pathlib.Path:
    # Keyed by the range only: every attempt of a task writes (and atomically replaces) the same file.
    return pathlib.Path(shard_dir) / f"shard-{start:010d}-{stop:010d}.npz"


def write_shard(path: pathlib.Path, labels, filenames, bboxes, source_index) -> None:
    """The metadata of a range's rows, under a partial name renamed onto ``path`` when complete."""
    with atomic_output(path) as partial, open(partial, "wb") as handle:
        np.savez(
            handle,
            labels=np.asarray(labels, np.int32),
            filenames=np.asarray(filenames, str),
            bboxes=np.asarray(bboxes, np.int32).reshape(-1, 4),
            source_index=np.asarray(source_index, np.int64),
        )


def expected_source_index(start: int, stop: int, copies: int, keep_original: bool) -> np.ndarray:
    """source_index of the output rows made from input rows [start, stop)."""
    per_source = ([-1] if keep_original else []) + [0] * copies
    base = np.tile(np.asarray(per_source, dtype=np.int64), stop - start)
    sources = np.repeat(np.arange(start, stop, dtype=np.int64), len(per_source))
    return np.where(base == -1, -1, sources)


def merge_metadata(results: list[dict], ranges: list[tuple[int, int]], spec: JobSpec, writer: HDF5SplitWriter) -> int:
    """Check every range's shard and write its metadata into ``writer`` (whose image block the tasks have
    filled); returns the number of rows. Any missing or wrong shard fails the job."""
    by_range = {(int(r["start"]), int(r["stop"])): r for r in results}
    if sorted(by_range) != sorted(ranges) or len(results) != len(ranges):
        raise AugmentError(f"Spark returned results for {len(results)} ranges, expected {len(ranges)}")
    total = 0
    for start, stop in ranges:
        path = shard_path(spec.shard_dir, start, stop)
        want = expected_source_index(start, stop, spec.copies, spec.keep_original)
        try:
            with np.load(path) as shard:
                rows = {key: shard[key] for key in SHARD_FIELDS}
        except (OSError, ValueError, KeyError) as exc:
            raise AugmentError(f"{path}: missing or unreadable metadata shard ({exc})") from None
        got = rows["source_index"]
        if int(by_range[(start, stop)]["rows"]) != len(want) or not np.array_equal(got, want):
            raise AugmentError(f"{path}: {len(got)} rows, expected {len(want)} for input rows {start}..{stop}")
        first = start * spec.rows_per_source
        span = slice(first, first + len(want))
        writer.labels[span] = rows["labels"]
        writer.filenames[span] = np.array([str(f) for f in rows["filenames"]], dtype=object)
        writer.bboxes[span] = rows["bboxes"]
        writer.source_index[span] = got
        total += len(want)
    writer.count = total
    return total
