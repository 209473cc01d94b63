"""The `preprocess` step's library: photo records -> train.h5, val.h5, test.h5 (``entry_points.preprocess`` is its CLI).

- ``plan_splits``: train / val / test record lists (val carved per class from train unless given; train shuffled).
- ``process_photo``: one photo through ``carclf_flavor.images.prepare_photo`` (the preparation the served model
  applies, with the same bbox policy) -> pixels, box used, clamped? or a skip reason.
- ``iter_processed``: ``process_photo`` over many photos in worker processes (``multiprocessing.Pool.imap``:
  results arrive in input order, so the output does not depend on timing); decoded images come back through
  shared memory, and at most a few chunks are in flight, so memory stays bounded whatever the dataset size.
- ``write_splits``: the single HDF5 writer: all three files and their manifest ``splits.json`` under temporary
  names, committed as one set (``carclf.files.atomic.commit_output_set``) only when every split is complete, after
  a check that the disk has room for them; skipped photos and clamped boxes counted and named.
- ``log_results``, ``class_count_chart``, ``sample_crops_grid``: what the step logs to its MLflow run.

Workers start through a fork server (a plain fork of a process whose OpenCV thread pool has run can
deadlock inside OpenCV), so a script calling ``preprocess()`` with workers != 1 needs the usual
``if __name__ == "__main__":`` guard, as with any spawn/forkserver multiprocessing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from carclf.data.hdf5_dataset import HDF5SplitWriter, estimated_split_bytes
from carclf.data.readers import DataLayoutError, ImageRecord, SourceDataset, stratified_split
from carclf.files.atomic import check_room_for, commit_output_set, partial_path, remove_stale_partials, write_error
from carclf_flavor.images import ImageDecodeError, PreprocessSettings, prepare_photo
from carclf_flavor.version import __version__

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "splits.json"  # what one run wrote into the folder: the set's id, files, counts and settings
WRITE_BATCH = 64  # images buffered per split before one HDF5 write
CHUNKS_IN_FLIGHT = 4  # per worker: enough to keep workers busy, few enough to bound memory
MAX_LOGGED_SKIPS = 20


# ----------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------
_worker_settings: PreprocessSettings | None = None
_worker_memory = None  # the parent's shared memory, attached once per worker
_worker_slots: np.ndarray | None = None


def _init_worker(settings_dict: dict, memory_name: str | None = None, num_slots: int = 0) -> None:
    global _worker_settings, _worker_memory, _worker_slots
    _worker_settings = PreprocessSettings.from_dict(settings_dict)
    if memory_name:
        from multiprocessing import shared_memory

        # Workers share the parent's resource tracker, so attaching here adds no second owner: the
        # parent alone unlinks the block.
        _worker_memory = shared_memory.SharedMemory(name=memory_name)
        size = int(_worker_settings.image_size)
        _worker_slots = np.ndarray((num_slots, size, size, 3), dtype=np.uint8, buffer=_worker_memory.buf)
    try:
        import cv2

        # One decode per process: OpenCV's own threads would only compete with the other workers.
        cv2.setNumThreads(1)
    except Exception:  # pragma: no cover
        pass


def process_photo(task: tuple[str, Sequence[int] | None], settings: PreprocessSettings | None = None):
    """One photo -> ("ok", image, box used, clamped?) or ("skip", reason). Runs in a worker process.

    ``carclf_flavor.images.prepare_photo`` does all of it, with the bbox policy the served model applies.
    """
    path, bbox = task
    settings = settings or _worker_settings
    try:
        image, used, clamped = prepare_photo(pathlib.Path(path), bbox, settings, return_box=True)
    except ImageDecodeError as exc:
        return ("skip", str(exc))
    except (OSError, ValueError, MemoryError) as exc:  # anything else a broken file can make a decoder raise
        return ("skip", f"cannot decode ({type(exc).__name__}: {exc})")
    return ("ok", image, used, clamped)


def _process_in_worker(item):
    """Worker entry: the decoded image goes into its shared-memory slot, not through the result pipe."""
    slot, task = item
    result = process_photo(task)
    if result[0] == "ok" and _worker_slots is not None:
        _worker_slots[slot] = result[1]
        return ("ok", None, result[2], result[3])
    return result


# ----------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------
def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _bounded(tasks: Iterable, window: threading.Semaphore, stop: threading.Event) -> Iterator:
    """Feed ``tasks`` to the pool no faster than results are consumed (memory bound)."""
    for task in tasks:
        while not window.acquire(timeout=0.1):
            if stop.is_set():
                return
        yield task


def _pool_context():
    # Not plain fork: a child forked from a parent whose OpenCV thread pool has run deadlocks in OpenCV
    # (seen in cv2.setNumThreads). The fork server is a fresh process that imports this module once
    # and then forks workers cheaply, for every pool this process creates.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def iter_processed(
    tasks: Sequence[tuple[str, Sequence[int] | None]], settings: PreprocessSettings, workers: int
) -> Iterator[tuple]:
    """``process_photo`` over ``tasks`` in input order, in ``workers`` processes (1 = in this process)."""
    if workers <= 1 or len(tasks) < 2:
        for task in tasks:
            yield process_photo(task, settings)
        return
    from multiprocessing import shared_memory

    chunksize = max(1, min(16, len(tasks) // (workers * 8)))
    # At most num_slots tasks are between "fed to the pool" and "result consumed"; task i therefore owns
    # slot i % num_slots exclusively until its result has been read. Images come back through that slot
    # (one memcpy) instead of being pickled through a pipe.
    num_slots = workers * chunksize * CHUNKS_IN_FLIGHT
    size = int(settings.image_size)
    window = threading.Semaphore(num_slots)
    stop = threading.Event()
    memory = shared_memory.SharedMemory(create=True, size=num_slots * size * size * 3)
    slots = np.ndarray((num_slots, size, size, 3), dtype=np.uint8, buffer=memory.buf)
    pool = None
    try:
        pool = _pool_context().Pool(
            workers, initializer=_init_worker, initargs=(settings.to_dict(), memory.name, num_slots)
        )
        numbered = ((i % num_slots, task) for i, task in enumerate(tasks))
        for i, result in enumerate(pool.imap(_process_in_worker, _bounded(numbered, window, stop), chunksize)):
            if result[0] == "ok" and result[1] is None:
                result = ("ok", slots[i % num_slots].copy(), result[2], result[3])
            window.release()
            yield result
        pool.close()
    finally:
        stop.set()
        if pool is not None:
            pool.terminate()
            pool.join()
        del slots
        memory.close()
        memory.unlink()


class _SplitBuffer:
    """Buffers a few images of one split and appends them to its writer in one call."""

    def __init__(self, writer: HDF5SplitWriter):
        self.writer = writer
        self.images, self.labels, self.names, self.boxes = [], [], [], []

    def add(self, image, label, name, box):
        self.images.append(image)
        self.labels.append(label)
        self.names.append(name)
        self.boxes.append(box)
        if len(self.images) >= WRITE_BATCH:
            self.flush()

    def flush(self):
        if self.images:
            self.writer.append(np.stack(self.images), self.labels, self.names, self.boxes)
            self.images, self.labels, self.names, self.boxes = [], [], [], []


def _relative_name(path: pathlib.Path, root: pathlib.Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def plan_splits(dataset: SourceDataset, val_fraction: float, seed: int) -> dict[str, list[ImageRecord]]:
    """train / val / test record lists: val is carved from train per class unless the layout has one.

    The train order is shuffled (seeded) so that a sequential reader sees mixed classes.
    """
    train = list(dataset.splits["train"])
    if "val" in dataset.splits:
        val = list(dataset.splits["val"])
        if val_fraction:
            log.info("%s has its own validation folder: val_fraction=%s not used", dataset.root, val_fraction)
    else:
        # A different stream than the test carve-out, so the two splits are independent draws.
        train, val = stratified_split(train, val_fraction, seed + 1)
    order = np.random.default_rng(int(seed)).permutation(len(train))
    train = [train[i] for i in order]
    return {"train": train, "val": val, "test": list(dataset.splits["test"])}


def write_splits(
    plan: dict[str, list[ImageRecord]],
    dataset: SourceDataset,
    output_dir: pathlib.Path,
    settings: PreprocessSettings,
    workers: int,
) -> tuple[dict[str, pathlib.Path], dict[str, np.ndarray], list[tuple[str, str]], list[str], float]:
    """Decode every record and write the three files; returns paths, label arrays, skips, clamps, seconds."""
    tasks, owners = [], []
    for split in SPLITS:
        for record in plan[split]:
            tasks.append((str(record.path), record.bbox))
            owners.append((split, record))
    writers: dict[str, HDF5SplitWriter] = {}
    skipped: list[tuple[str, str]] = []
    clamped: list[str] = []
    labels: dict[str, list[int]] = {split: [] for split in SPLITS}
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output_dir, log)
    check_room_for_splits(plan, dataset, output_dir, settings)
    output_set = output_set_id(plan, dataset, settings)
    try:
        for split in SPLITS:
            writers[split] = HDF5SplitWriter(
                output_dir / f"{split}.h5",
                dataset.class_names,
                settings,
                split=split,
                expected_rows=len(plan[split]),
                attrs={"output_set": output_set},
            )
        buffers = {split: _SplitBuffer(writers[split]) for split in SPLITS}
        progress = _progress(len(tasks))
        start = time.perf_counter()
        for (split, record), result in zip(owners, iter_processed(tasks, settings, workers)):
            name = _relative_name(record.path, dataset.root)
            if result[0] == "skip":
                skipped.append((name, result[1]))
                if len(skipped) <= MAX_LOGGED_SKIPS:
                    log.warning("skipped %s: %s", name, result[1])
            else:
                _, image, box, was_clamped = result
                if was_clamped:
                    clamped.append(name)
                    if len(clamped) <= MAX_LOGGED_SKIPS:
                        log.warning("%s: bounding box %s clamped to the photo: %s", name, record.bbox, box)
                buffers[split].add(image, record.label, name, box)
                labels[split].append(record.label)
            progress.update(1)
            if skipped:
                progress.set_postfix(skipped=len(skipped), refresh=False)
        for buffer in buffers.values():
            buffer.flush()
        seconds = time.perf_counter() - start
        progress.close()
        if not labels["train"]:
            raise DataLayoutError(f"{dataset.root}: no usable training photos ({len(skipped)} skipped)")
        # Commit only when every split is complete: all three files and the manifest appear, or none.
        landed = {writers[split].finish(): writers[split].path for split in SPLITS}
        manifest = output_dir / MANIFEST
        landed[_write_manifest(manifest, output_set, dataset, settings, labels, skipped)] = manifest
        commit_output_set(landed)
        paths = {split: writers[split].path for split in SPLITS}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        partial_path(output_dir / MANIFEST).unlink(missing_ok=True)
        raise
    if len(skipped) > MAX_LOGGED_SKIPS:
        log.warning("... %d more photos skipped (all listed in the run's skipped.txt)", len(skipped) - MAX_LOGGED_SKIPS)
    if len(clamped) > MAX_LOGGED_SKIPS:
        log.warning("... %d more bounding boxes clamped", len(clamped) - MAX_LOGGED_SKIPS)
    return paths, {s: np.asarray(v, dtype=np.int32) for s, v in labels.items()}, skipped, clamped, seconds


def check_room_for_splits(plan, dataset: SourceDataset, output_dir: pathlib.Path, settings: PreprocessSettings) -> None:
    """Refuse in one line, before any photo is decoded, when the new split set cannot fit beside the earlier
    one (which stays until the new set is complete): on the output's disk, and on the staging disk when the
    files are built there."""
    needed = sum(
        estimated_split_bytes(
            len(plan[split]),
            settings.image_size,
            name_bytes=sum(len(str(record.path)) for record in plan[split]),
            num_classes=len(dataset.class_names),
        )
        for split in SPLITS
    )
    check_room_for(output_dir, needed, "train.h5, val.h5 and test.h5")


def output_set_id(plan, dataset: SourceDataset, settings: PreprocessSettings) -> str:
    """An id of the split set these inputs make: the same inputs (photos, boxes, split plan, settings) give the
    same bytes and the same id, so files carrying different ids come from runs whose outputs differ."""
    digest = hashlib.sha256()
    digest.update(json.dumps([__version__, settings.to_dict(), list(dataset.class_names)]).encode())
    for split in SPLITS:
        for record in plan[split]:
            try:
                stat = record.path.stat()
                stamp = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                stamp = (-1, -1)
            box = None if record.bbox is None else [int(v) for v in record.bbox]
            digest.update(json.dumps([split, str(record.path), int(record.label), box, stamp]).encode())
    return digest.hexdigest()[:32]


def _write_manifest(path, output_set, dataset, settings, labels, skipped) -> pathlib.Path:
    """The manifest under its partial name (committed with the splits)."""
    content = {
        "output_set": output_set,
        "files": {split: f"{split}.h5" for split in SPLITS},
        "images": {split: len(labels[split]) for split in SPLITS},
        "skipped_images": len(skipped),
        "class_names": list(dataset.class_names),
        "preprocessing": settings.to_dict(),
        "source": str(dataset.root),
        "carclf_version": __version__,
    }
    partial = partial_path(path)
    try:
        partial.write_text(json.dumps(content, indent=2, sort_keys=True))
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    return partial


def _progress(total: int):
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc="preprocess",
        unit="img",
        file=sys.stderr,
        mininterval=0.5 if interactive else 15.0,
        dynamic_ncols=interactive,
    )


def log_params(params: dict) -> None:
    from carclf.tracking.runs import log_new_params

    log_new_params(params)


def class_count_chart(class_names: Sequence[str], labels: dict[str, np.ndarray]) -> str:
    """Images per class and split, as an SVG stacked bar chart."""
    from carclf.reporting.figures import stacked_bar_svg

    num = len(class_names)
    series = {split: np.bincount(labels[split], minlength=num)[:num] for split in SPLITS}
    return stacked_bar_svg(class_names, series, title=f"Images per class ({num} classes)")


def sample_crops_grid(train_path: pathlib.Path, class_names: Sequence[str], max_images: int = 25) -> np.ndarray:
    """The first crop of each class (then more crops, up to 16), at the stored pixels, captioned with its class:
    the crop and resize settings can be checked by eye."""
    import h5py

    from carclf.reporting.figures import image_grid

    with h5py.File(train_path, "r") as f:
        file_labels = f["labels"][()]
        rows, seen = [], set()
        for i, label in enumerate(file_labels):
            if label not in seen:
                seen.add(label)
                rows.append(i)
            if len(rows) >= max_images:
                break
        for i in range(len(file_labels)):  # fewer classes than slots: fill up with more photos
            if len(rows) >= min(max_images, 16, len(file_labels)):
                break
            if i not in rows:
                rows.append(i)
        images = [f["images"][i] for i in rows]
        names = [[class_names[int(file_labels[i])]] for i in rows]
    cols = int(np.ceil(np.sqrt(max(1, len(images)))))
    return image_grid(images, names, cols=cols, title="Sample training crops")


def log_results(dataset, settings, paths, labels, skipped, clamped, seconds, processed) -> None:
    import mlflow

    counts = {split: int(len(labels[split])) for split in SPLITS}
    mlflow.log_metrics(
        {
            **{f"{split}_images": counts[split] for split in SPLITS},
            "num_classes": len(dataset.class_names),
            "skipped_images": len(skipped),
            "clamped_bboxes": len(clamped),
            "preprocess_seconds": seconds,
            "images_per_second": processed / seconds if seconds > 0 else 0.0,
        }
    )
    mlflow.set_tags({f"carclf.output.{split}": str(path) for split, path in paths.items()})
    mlflow.log_text("".join(f"{name}\t{reason}\n" for name, reason in skipped), "skipped.txt")
    mlflow.log_text("".join(f"{i}\t{name}\n" for i, name in enumerate(dataset.class_names)), "class_names.txt")
    mlflow.log_text(settings.to_json(), "preprocessing.json")
    # Drawn without matplotlib (its import and layout cost ~1 s, a third of preprocessing 2,000 photos).
    mlflow.log_text(class_count_chart(dataset.class_names, labels), "class_counts.svg")
    if counts["train"]:
        from carclf.reporting.figures import log_png

        log_png(sample_crops_grid(paths["train"], dataset.class_names), "sample_crops.png")
