"""`augment`: image augmentation of an HDF5 split, scaled out on Spark through pyspark.pandas (Koalas' successor).

``python -m entry_points.augment --input train.h5 --output train_aug.h5 --copies 2 --ops crop,pad,flip``

How the work is spread:
- The driver validates the input, cuts its rows into index ranges (one per Spark partition) and builds a
  pandas-on-Spark DataFrame that carries only the range ids: no pixel ever passes through the driver or
  through Spark rows.
- Before the job the driver creates ``output`` under a temporary name with the image block preallocated
  (contiguous, every row's byte offset known). Each task opens the input HDF5 itself, reads its range
  chunk by chunk (memory bounded by one chunk, not by the partition or the dataset), augments with OpenCV
  and ``pwrite``s its images straight into its own rows of that block: the pixels are written once and
  never copied or merged. Then it writes its rows' labels, file names, boxes and source_index as a small
  metadata shard, keyed by the index range (never by the attempt), under a temporary name renamed when
  complete: the shard marks the range as done. A retried (or speculative) attempt rewrites the same rows
  and the same shard with the same bytes, so nothing is duplicated or lost.
- The driver checks that every range has its shard with exactly the expected rows, writes the metadata
  into the output, renames it into place and removes the shards. A failed job removes its partial output
  and every shard.

Output rows, per source image in input order: the original (``keep_original``), then copies 1..``copies``.
``source_index`` is the input row of an augmented image and -1 for an original (the schema's convention).

Randomness is keyed by (seed, source row, copy number) and nothing else, so the output is byte-identical
whatever the number of partitions, the master, or the retries, and equal to ``augment_in_process``.
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import h5py
import numpy as np

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import param, resolve_config, run_step
from carclf.compute.spark_session import SparkSetupError
from carclf.data.hdf5_dataset import (
    DatasetError,
    HDF5SplitWriter,
    partial_path,
    read_dataset_info,
    remove_stale_partials,
)
from carclf.tracking.runs import log_new_params, step_run
from carclf_flavor.images import PAD_VALUE

log = logging.getLogger(__name__)

OPS = ("crop", "pad", "flip", "rotate", "brightness", "contrast", "hue", "blur", "cutout")
DEFAULT_OPS = "crop,pad,flip"
# Source images read, augmented and written at a time inside a task: bounds a task's memory
# (about CHUNK * (1 + copies) images) whatever the size of its partition.
CHUNK = 32
# partitions=0: TASKS_PER_CORE tasks per core (a slow or busy core does not hold up the job: the
# others take its remaining tasks), and no task larger than MAX_IMAGES_PER_TASK source images, so a
# retried task redoes little work and big inputs spread over a cluster.
TASKS_PER_CORE = 2
MAX_IMAGES_PER_TASK = 1024
# Test hook for fault tolerance, read by the DRIVER and passed to the tasks: "once:<dir>" makes the
# first attempt of every task crash its Python worker halfway through its shard (a marker file in
# <dir> remembers the attempt); "always" makes every attempt fail.
FAIL_ENV = "CARCLF_AUGMENT_INJECT_FAILURE"


class AugmentError(ValueError):
    """Bad parameters or a failed augmentation job; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Which ops run (in this order) and how strong they are; every op keeps the image size."""

    ops: tuple = ("crop", "pad", "flip")
    crop_scale: float = 0.8  # crop: random square of side U(crop_scale, 1) * S, resized back to S
    pad_fraction: float = 0.1  # pad: pad by pad_fraction * S (grey) and crop back at a random offset
    flip_prob: float = 0.5  # flip: horizontal mirror with this probability
    rotate_degrees: float = 15.0  # rotate: angle U(-d, d), reflected borders
    brightness: float = 0.2  # brightness: add U(-b, b) * 255
    contrast: float = 0.2  # contrast: scale around the mean by U(1 - c, 1 + c)
    hue_degrees: float = 10.0  # hue: rotate the hue by U(-h, h) degrees
    blur_sigma: float = 1.0  # blur: Gaussian, sigma U(0.1, blur_sigma)
    cutout_fraction: float = 0.25  # cutout: one grey square of side cutout_fraction * S

    def __post_init__(self):
        limits = {
            "crop_scale": (0.05, 1.0),
            "pad_fraction": (0.0, 0.5),
            "flip_prob": (0.0, 1.0),
            "rotate_degrees": (0.0, 180.0),
            "brightness": (0.0, 1.0),
            "contrast": (0.0, 1.0),
            "hue_degrees": (0.0, 180.0),
            "blur_sigma": (0.1, 20.0),
            "cutout_fraction": (0.01, 1.0),
        }
        for name, (lo, hi) in limits.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and lo <= value <= hi):
                raise AugmentError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
        unknown = [op for op in self.ops if op not in OPS]
        if unknown:
            raise AugmentError(f"unknown op(s) {', '.join(map(repr, unknown))}; choose from {', '.join(OPS)}")

    @classmethod
    def parse(cls, ops: str | Sequence[str], **strengths) -> "AugmentParams":
        names = [o.strip().lower() for o in (ops.split(",") if isinstance(ops, str) else ops)]
        names = [o for o in names if o]
        if not names:
            raise AugmentError(f"ops is empty; choose from {', '.join(OPS)}")
        ordered = tuple(dict.fromkeys(names))  # applied in the given order, each once
        return cls(ops=ordered, **{k: float(v) for k, v in strengths.items()})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["ops"] = ",".join(self.ops)
        return out


# ---------------------------------------------------------------------------------------------------
# The ops: (S, S, 3) uint8 RGB in, same shape out. Each draws its random numbers unconditionally so the
# stream of one op never depends on the outcome of another.


def _cv2():
    import cv2

    return cv2


def _crop(img, rng, p: AugmentParams):
    size = img.shape[0]
    side = max(1, int(round(size * rng.uniform(p.crop_scale, 1.0))))
    x = int(rng.integers(0, size - side + 1))
    y = int(rng.integers(0, size - side + 1))
    if side == size:
        return img
    return _cv2().resize(img[y : y + side, x : x + side], (size, size), interpolation=_cv2().INTER_LINEAR)


def _pad(img, rng, p: AugmentParams):
    size = img.shape[0]
    pad = int(round(size * p.pad_fraction))
    dx = int(rng.integers(-pad, pad + 1))
    dy = int(rng.integers(-pad, pad + 1))
    if dx == 0 and dy == 0:
        return img
    # Pad by `pad` on every side and crop an S x S window back at (pad + dx, pad + dy): the same as
    # shifting the image by (-dx, -dy) over a grey canvas, without building the padded array.
    out = np.full_like(img, PAD_VALUE)
    src_x, dst_x = (dx, 0) if dx > 0 else (0, -dx)
    src_y, dst_y = (dy, 0) if dy > 0 else (0, -dy)
    w, h = size - abs(dx), size - abs(dy)
    out[dst_y : dst_y + h, dst_x : dst_x + w] = img[src_y : src_y + h, src_x : src_x + w]
    return out


def _flip(img, rng, p: AugmentParams):
    # cv2.flip is ~10x faster than copying numpy's reversed view of interleaved RGB.
    return _cv2().flip(img, 1) if rng.random() < p.flip_prob else img


def _rotate(img, rng, p: AugmentParams):
    cv2 = _cv2()
    size = img.shape[0]
    angle = rng.uniform(-p.rotate_degrees, p.rotate_degrees)
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2.0, (size - 1) / 2.0), angle, 1.0)
    return cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _lut(img, table):
    return _cv2().LUT(img, np.clip(np.rint(table), 0, 255).astype(np.uint8))


def _brightness(img, rng, p: AugmentParams):
    delta = rng.uniform(-p.brightness, p.brightness) * 255.0
    return _lut(img, np.arange(256, dtype=np.float64) + delta)


def _contrast(img, rng, p: AugmentParams):
    factor = rng.uniform(1.0 - p.contrast, 1.0 + p.contrast)
    mean = float(np.mean(_cv2().mean(img)[:3]))  # cv2.mean: one pass, no float64 copy of the image
    return _lut(img, (np.arange(256, dtype=np.float64) - mean) * factor + mean)


def _hue(img, rng, p: AugmentParams):
    cv2 = _cv2()
    # HSV_FULL spreads the hue over 0..255 (1.4 degrees a step) instead of 0..179.
    shift = int(round(rng.uniform(-p.hue_degrees, p.hue_degrees) * 256.0 / 360.0))
    if shift == 0:
        return img
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int16) + shift) % 256).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _blur(img, rng, p: AugmentParams):
    sigma = rng.uniform(0.1, p.blur_sigma)
    return _cv2().GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma)


def _cutout(img, rng, p: AugmentParams):
    size = img.shape[0]
    side = max(1, int(round(size * p.cutout_fraction)))
    cx, cy = int(rng.integers(0, size)), int(rng.integers(0, size))
    x1, y1 = max(0, cx - side // 2), max(0, cy - side // 2)
    out = img.copy()
    out[y1 : min(size, y1 + side), x1 : min(size, x1 + side)] = PAD_VALUE
    return out


_OP_FUNCS: dict[str, Callable] = {
    "crop": _crop,
    "pad": _pad,
    "flip": _flip,
    "rotate": _rotate,
    "brightness": _brightness,
    "contrast": _contrast,
    "hue": _hue,
    "blur": _blur,
    "cutout": _cutout,
}


def rng_for(seed: int, source_row: int, copy: int) -> np.random.Generator:
    """The random stream of one augmented image: depends on nothing but these three numbers."""
    return np.random.default_rng([int(seed), int(source_row), int(copy)])


def augment_image(image: np.ndarray, params: AugmentParams, rng: np.random.Generator) -> np.ndarray:
    out = image
    for op in params.ops:
        out = _OP_FUNCS[op](out, rng, params)
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------------------
# One index range: read -> augment -> write. Runs inside a Spark task or in the plain in-process loop.


@dataclasses.dataclass(frozen=True)
class JobSpec:
    input: str
    copies: int
    keep_original: bool
    params: AugmentParams
    seed: int
    shard_dir: str = ""
    fail_mode: str = ""  # FAIL_ENV's value at submit time (tests only)
    output_tmp: str = ""  # the output's temporary file, whose preallocated image block the tasks write into
    images_offset: int = 0  # byte offset of output row 0 in that file
    row_bytes: int = 0

    @property
    def rows_per_source(self) -> int:
        return self.copies + (1 if self.keep_original else 0)


def expected_source_index(start: int, stop: int, copies: int, keep_original: bool) -> np.ndarray:
    """source_index of the output rows made from input rows [start, stop)."""
    per_source = ([-1] if keep_original else []) + [0] * copies
    base = np.tile(np.asarray(per_source, dtype=np.int64), stop - start)
    sources = np.repeat(np.arange(start, stop, dtype=np.int64), len(per_source))
    return np.where(base == -1, -1, sources)


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


def shard_path(shard_dir: str | os.PathLike, start: int, stop: int) -> pathlib.Path:
    # Keyed by the range only: every attempt of a task writes (and atomically replaces) the same file.
    return pathlib.Path(shard_dir) / f"shard-{start:010d}-{stop:010d}.npz"


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
        partial = partial_path(target)
        try:
            with open(partial, "wb") as handle:
                np.savez(
                    handle,
                    labels=np.asarray(self.labels, np.int32),
                    filenames=np.asarray(self.filenames, str),
                    bboxes=np.asarray(self.bboxes, np.int32).reshape(-1, 4),
                    source_index=np.asarray(self.source_index, np.int64),
                )
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def close(self) -> None:
        os.close(self.fd)


def _input_meta(path: str):
    """class names, settings and split attribute of the input (validated)."""
    info = read_dataset_info(path)
    with h5py.File(path, "r") as f:
        split = f.attrs.get("split", "")
    split = split.decode() if isinstance(split, bytes) else str(split)
    return info, split


def run_range(spec: JobSpec, start: int, stop: int) -> dict:
    """Body of one Spark task: input rows [start, stop) -> their rows of the output's image block, then
    the range's metadata shard; returns counts."""
    _single_threaded_opencv()
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


def _single_threaded_opencv() -> None:
    # Spark runs one task per core: OpenCV's own thread pool would only oversubscribe the cores.
    _cv2().setNumThreads(1)


# ---------------------------------------------------------------------------------------------------
# Driver side


def plan_ranges(num_images: int, partitions: int) -> list[tuple[int, int]]:
    """``partitions`` contiguous, near-equal input row ranges (empty ones dropped)."""
    if num_images == 0:
        return []
    partitions = max(1, min(partitions, num_images))
    bounds = [round(i * num_images / partitions) for i in range(partitions + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def auto_partitions(num_images: int, parallelism: int) -> int:
    return max(1, TASKS_PER_CORE * parallelism, math.ceil(num_images / MAX_IMAGES_PER_TASK))


def run_on_spark(spark, spec: JobSpec, ranges: list[tuple[int, int]]) -> list[dict]:
    """One Spark task per range through pyspark.pandas; returns one result dict per range.

    Why ``pandas_on_spark.apply_batch`` and not mapInArrow: the frame holds only range ids (a handful of
    rows), never pixels: each task reads its images straight from the HDF5 file and writes them into the
    output, so Arrow's zero-copy columnar transfer would have nothing to speed up, and the pandas API
    (Koalas' successor, as in the article) is the simpler, equally fast choice. Three details keep it fast:
    - the return type hint: without it pandas-on-Spark runs the function once on the driver to infer a
      schema, which here would augment a whole range twice;
    - ``index_col="id"``: no default index, which would cost an extra Spark job;
    - ``spark.range(n, numPartitions=n)``: exactly one range per partition (one task each);
    - results collected with ``to_spark().collect()``, not ``to_pandas()``: the same rows, but measured here
      ~0.15 s less per job (0.27 s vs 0.42 s for an empty 4-task job on local[2], as fast as mapInArrow).
    """
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    import pandas as pd
    import pyspark.pandas as ps

    bounds = list(ranges)
    payload = (spec, bounds)

    def augment_batch(pdf: pd.DataFrame, job) -> pd.DataFrame:
        job_spec, job_ranges = job
        results = [run_range(job_spec, *job_ranges[int(i)]) for i in pdf.index]
        frame = pd.DataFrame(results, columns=["start", "stop", "rows", "seconds", "cpu_seconds"])
        frame.index = pdf.index
        return frame

    augment_batch.__annotations__["return"] = ps.DataFrame[
        int, [("start", int), ("stop", int), ("rows", int), ("seconds", float), ("cpu_seconds", float)]
    ]
    tasks = spark.range(0, len(bounds), numPartitions=len(bounds)).pandas_api(index_col="id")
    job = tasks.pandas_on_spark.apply_batch(augment_batch, args=(payload,))
    group = f"carclf-augment-{uuid.uuid4().hex[:8]}"
    with _TaskProgress(spark, group, len(bounds)) as progress:
        try:
            rows = job.to_spark(index_col="id").collect()  # a handful of small rows: one per range
        except BaseException:
            progress.wait_until_idle()
            raise
    return sorted((row.asDict() for row in rows), key=lambda result: result["start"])


class _TaskProgress:
    """Logs finished/total Spark tasks of the job group every few seconds (a long job shows progress)."""

    def __init__(self, spark, group: str, total: int, every_s: float = 5.0):
        self.spark, self.group, self.total, self.every_s = spark, group, total, every_s
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        try:
            self.sc = self.spark.sparkContext
            self.sc.setJobGroup(self.group, "carclf augment", interruptOnCancel=True)
        except Exception:  # Spark Connect: no SparkContext, no progress
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        last = -1
        tracker = self.sc.statusTracker()
        while not self._stop.wait(self.every_s):
            done = 0
            for job_id in tracker.getJobIdsForGroup(self.group):
                job = tracker.getJobInfo(job_id)
                for stage_id in job.stageIds if job else []:
                    stage = tracker.getStageInfo(stage_id)
                    done += stage.numCompletedTasks if stage else 0
            if done != last:
                log.info("augment: %d/%d Spark tasks done", done, self.total)
                last = done

    def wait_until_idle(self, timeout_s: float = 15.0) -> None:
        """After a failed job, wait (bounded) for its still-running attempts to be killed, so none of them
        writes a shard after the driver has cleaned the shard folder."""
        try:
            tracker = self.sc.statusTracker()
        except AttributeError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = 0
            for job_id in tracker.getJobIdsForGroup(self.group):
                job = tracker.getJobInfo(job_id)
                for stage_id in job.stageIds if job else []:
                    stage = tracker.getStageInfo(stage_id)
                    active += stage.numActiveTasks if stage else 0
            if active == 0:
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=1)
        try:
            self.sc.setLocalProperty("spark.jobGroup.id", None)
        except Exception:
            pass
        return False


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
                rows = {key: shard[key] for key in ("labels", "filenames", "bboxes", "source_index")}
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


def _validate(input, output, copies, keep_original, seed, partitions) -> tuple[pathlib.Path, pathlib.Path]:
    if copies < 0:
        raise AugmentError(f"copies must be >= 0, got {copies}")
    if copies == 0 and not keep_original:
        raise AugmentError("copies=0 with keep_original=false would write an empty file")
    if seed < 0:
        raise AugmentError(f"seed must be >= 0, got {seed}")
    if partitions < 0:
        raise AugmentError(f"partitions must be >= 0 (0 = automatic), got {partitions}")
    if not str(input):
        raise AugmentError("input is empty; give the HDF5 split to augment")
    if not str(output):
        raise AugmentError("output is empty; give the HDF5 file to write")
    input_path, output_path = pathlib.Path(input).resolve(), pathlib.Path(output).resolve()
    if input_path == output_path:
        raise AugmentError(f"output {output_path} is the input file; choose another name")
    if output_path.is_dir():
        raise AugmentError(f"output {output_path} is a folder; give a file name such as train_aug.h5")
    return input_path, output_path


def _file_attrs(spec: JobSpec, input_path: pathlib.Path, engine: str) -> dict:
    return {
        "augment_source": str(input_path),
        "augment_copies": spec.copies,
        "augment_keep_original": spec.keep_original,
        "augment_seed": spec.seed,
        "augment_params": json.dumps(spec.params.to_dict(), sort_keys=True),
        "augment_layout": "per source row: original (source_index -1) if kept, then copies 1..augment_copies",
        "augment_engine": engine,
    }


_STRENGTHS = AugmentParams()  # the op strengths' defaults live in AugmentParams
STRENGTHS = tuple(f.name for f in dataclasses.fields(AugmentParams) if f.name != "ops")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The `augment` step's parameters (CLI flags, MLproject parameters and keyword arguments alike).

    ``input``/``output`` default to the files ``preprocess`` writes by default, on the CLI as in MLproject
    (they used to be required on the CLI only): one rule, the declaration's default applies everywhere.
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
    input, output, copies, keep_original, seed, partitions, spark_master = (  # noqa: A001 - the MLproject name
        c.input,
        c.output,
        c.copies,
        c.keep_original,
        c.seed,
        c.partitions,
        c.spark_master,
    )
    params = AugmentParams.parse(c.ops, **{name: getattr(c, name) for name in STRENGTHS})
    input_path, output_path = _validate(input, output, int(copies), keep_original, int(seed), int(partitions))
    info, split = _input_meta(str(input_path))  # DatasetError for a missing or malformed file, before Spark starts

    from carclf.compute.spark_session import get_spark, session_master

    startup_began = time.perf_counter()
    spark = get_spark(spark_master, app_name="carclf-augment")
    startup_s = time.perf_counter() - startup_began
    master = session_master(spark)
    # Throughput counts the job and the metadata merge, not the JVM start (paid once per process, or never
    # on a cluster whose session is already up); seconds_spark_startup reports that separately.
    began = time.perf_counter()
    parallelism = _default_parallelism(spark)
    num_partitions = int(partitions) or auto_partitions(info.num_images, parallelism)
    ranges = plan_ranges(info.num_images, num_partitions)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output_path.parent, log)
    # The pid in the name lets the next run tell a killed run's shards from a live one's.
    shard_dir = output_path.parent / f".{output_path.name}.shards-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    spec = JobSpec(
        input=str(input_path),
        copies=int(copies),
        keep_original=bool(keep_original),
        params=params,
        seed=int(seed),
        shard_dir=str(shard_dir),
        fail_mode=os.environ.get(FAIL_ENV, ""),
    )
    log.info(
        "augment: %d images x %d rows each -> %s on Spark %s, %d tasks",
        info.num_images,
        spec.rows_per_source,
        output_path,
        master,
        len(ranges),
    )
    shard_dir.mkdir()
    try:
        # Leaving this block by an exception removes the temporary output; tasks still running then
        # fail to open it (or write into a deleted file): nothing stays behind.
        with HDF5SplitWriter(
            output_path,
            info.class_names,
            info.settings,
            split=split,
            with_source_index=True,
            expected_rows=info.num_images * spec.rows_per_source,
            preallocate_images=True,
            attrs=_file_attrs(spec, input_path, f"spark {master}"),
        ) as writer:
            spec = dataclasses.replace(
                spec,
                output_tmp=str(writer.tmp_path),
                images_offset=writer.images_offset or 0,
                row_bytes=writer.row_bytes,
            )
            spark_began = time.perf_counter()
            try:
                results = run_on_spark(spark, spec, ranges) if ranges else []
            except AugmentError:
                raise
            except Exception as exc:  # Py4J/PythonException: keep the task's own last error line
                raise AugmentError(f"Spark job on {master} failed: {task_error_line(exc)}") from None
            spark_s = time.perf_counter() - spark_began
            merge_began, merge_cpu_began = time.perf_counter(), time.process_time()
            total = merge_metadata(results, ranges, spec, writer)
        merge_s, merge_cpu_s = time.perf_counter() - merge_began, time.process_time() - merge_cpu_began
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
    seconds = time.perf_counter() - began
    summary = {
        "output": str(output_path),
        "num_source_images": info.num_images,
        "num_output_images": total,
        "num_augmented": info.num_images * spec.copies,
        "num_originals": info.num_images if keep_original else 0,
        "partitions": len(ranges),
        "spark_master": master,
        "seconds": seconds,
        "seconds_spark_job": spark_s,
        "seconds_merge": merge_s,
        "seconds_spark_startup": startup_s,
        "images_per_second": total / seconds if seconds > 0 else 0.0,
        "task_seconds": sum(float(r["seconds"]) for r in results),
        # CPU time of the Python tasks and of the merge: the work done, whatever else shares the cores.
        "task_cpu_seconds": sum(float(r["cpu_seconds"]) for r in results),
        "merge_cpu_seconds": merge_cpu_s,
    }
    log.info(
        "augment: wrote %d images to %s in %.1f s (%.0f images/s)",
        total,
        output_path,
        seconds,
        summary["images_per_second"],
    )
    if c.log_to_mlflow:
        _log_to_mlflow(summary, spec, input_path, output_path)
    return summary


def augment_in_process(
    input,
    output,
    copies: int = AugmentConfig.copies,
    keep_original: bool = AugmentConfig.keep_original,
    ops: str = AugmentConfig.ops,
    seed: int = AugmentConfig.seed,
    **strengths,
) -> dict:
    """The same augmentation as a plain single-process loop, no Spark: the benchmark's baseline and the
    reference the Spark output must equal byte for byte."""
    params = AugmentParams.parse(ops, **strengths)
    input_path, output_path = _validate(input, output, int(copies), keep_original, int(seed), 0)
    info, split = _input_meta(str(input_path))
    spec = JobSpec(
        input=str(input_path), copies=int(copies), keep_original=bool(keep_original), params=params, seed=int(seed)
    )
    _single_threaded_opencv()
    began, cpu_began = time.perf_counter(), time.process_time()
    total = info.num_images * spec.rows_per_source
    with (
        h5py.File(input_path, "r") as source,
        HDF5SplitWriter(
            output_path,
            info.class_names,
            info.settings,
            split=split,
            with_source_index=True,
            expected_rows=total,
            attrs=_file_attrs(spec, input_path, "in-process"),
        ) as writer,
    ):
        write_range(spec, writer, source, 0, info.num_images)
    seconds = time.perf_counter() - began
    return {
        "output": str(output_path),
        "num_output_images": total,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_began,
        "images_per_second": total / seconds if seconds > 0 else 0.0,
    }


def _default_parallelism(spark) -> int:
    try:
        return int(spark.sparkContext.defaultParallelism)
    except Exception:
        return 2


def task_error_line(exc: BaseException) -> str:
    """The last 'SomeError: message' line of a task's Python traceback, else the first line."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head and not head.startswith("py4j"):
            return line
    for line in lines:
        if "Python worker exited unexpectedly" in line or "crashed" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def _log_to_mlflow(summary: dict, spec: JobSpec, input_path: pathlib.Path, output_path: pathlib.Path) -> None:
    import mlflow

    with step_run():
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
        mlflow.log_metrics(
            {
                k: float(summary[k])
                for k in (
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
            }
        )
        grid = sample_grid(input_path, output_path, spec.copies)
        if grid is not None:
            from carclf.reporting.reports import log_png

            log_png(grid, "augment_samples.png")


def sample_grid(input_path, output_path, copies: int, rows: int = 6, max_copies: int = 5) -> np.ndarray | None:
    """A picture: each row one source image (original) beside its first augmented variants."""
    if copies == 0:
        return None
    from carclf.reporting.reports import image_grid

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
        expected_errors=(AugmentError, DatasetError, SparkSetupError),
        print_result=_print_summary,
    )


if __name__ == "__main__":
    sys.exit(main())
