"""The carclf HDF5 dataset: one file per split, written atomically, validated on open.

Schema (every split file, whoever writes it: preprocess, augment):
- ``images``      uint8  (N, S, S, 3) RGB, chunked one image per chunk
- ``labels``      int32  (N,) 0-based, index into ``class_names``
- ``class_names`` UTF-8 strings (C,)
- ``filenames``   UTF-8 strings (N,) source file of each image
- ``bboxes``      int32  (N, 4) x1, y1, x2, y2 in source pixels: the box the crop used (whole photo: crop=none or no box)
- ``source_index`` int64 (N,) optional: row of the source file an augmented image came from (-1: original)
- attributes: ``image_size``, ``crop``, ``crop_margin``, ``resize_mode``, ``carclf_version``, ``split``
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import h5py
import numpy as np

from carclf.files.atomic import StagedFile
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.version import __version__

REQUIRED_DATASETS = ("images", "labels", "class_names", "filenames", "bboxes")
SETTINGS_ATTRS = ("image_size", "crop", "crop_margin", "resize_mode")
_STR = h5py.string_dtype(encoding="utf-8")


class DatasetError(ValueError):
    """An HDF5 file that is not a usable carclf dataset; the message names the file and the problem."""


class HDF5SplitWriter:
    """Appends images to a split file under a temporary name; ``commit()`` renames it into place.

    The temporary file is beside the split, or on local disk when the split's folder takes only sequential
    writes (a Unity Catalog Volume, DBFS: ``carclf.files.atomic.StagedFile``); ``commit()`` then copies it there
    in one pass before the rename.

    Used as a context manager: leaving the block by an exception removes the partial file, so a
    killed or failed run never leaves a file that looks finished.

    ``preallocate_images=True`` (needs ``expected_rows``): the images are one contiguous block of exactly
    ``expected_rows`` rows, allocated at creation and never filled, at byte ``images_offset`` of the
    temporary file, ``row_bytes`` per image. Other processes (augment's Spark tasks) then write their rows
    straight into it with ``pwrite``: nothing is copied afterwards.
    """

    def __init__(
        self,
        path: os.PathLike | str,
        class_names: Sequence[str],
        settings: PreprocessSettings,
        split: str = "",
        with_source_index: bool = False,
        expected_rows: int = 0,
        attrs: dict | None = None,
        preallocate_images: bool = False,
    ):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._staged = StagedFile(self.path)
        self.tmp_path = self._staged.work_path
        size = int(settings.image_size)
        self._file = h5py.File(self.tmp_path, "w")
        f = self._file
        initial = max(0, int(expected_rows))
        self.row_bytes = size * size * 3
        self.images_offset: int | None = None
        if preallocate_images and initial:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every byte is written by the tasks
            space = h5py.h5s.create_simple((initial, size, size, 3))
            self.images = h5py.Dataset(h5py.h5d.create(f.id, b"images", h5py.h5t.NATIVE_UINT8, space, dcpl=dcpl))
            self.images_offset = int(self.images.id.get_offset())
            f.flush()
        else:
            self.images = f.create_dataset(
                "images",
                shape=(initial, size, size, 3),
                maxshape=(None, size, size, 3),
                dtype=np.uint8,
                chunks=(1, size, size, 3),
            )
        self.labels = f.create_dataset("labels", shape=(initial,), maxshape=(None,), dtype=np.int32, chunks=(4096,))
        self.filenames = f.create_dataset("filenames", shape=(initial,), maxshape=(None,), dtype=_STR, chunks=(4096,))
        self.bboxes = f.create_dataset(
            "bboxes", shape=(initial, 4), maxshape=(None, 4), dtype=np.int32, chunks=(4096, 4)
        )
        self.source_index = (
            f.create_dataset("source_index", shape=(initial,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
            if with_source_index
            else None
        )
        f.create_dataset("class_names", data=np.array(list(class_names), dtype=object), dtype=_STR)
        for key, value in settings.to_dict().items():
            f.attrs[key] = value
        f.attrs["carclf_version"] = __version__
        f.attrs["split"] = split
        # Extra file attributes of the step that wrote the file (e.g. augment's settings).
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        self.count = 0
        self._capacity = initial

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, self._capacity * 2, 64)
        for ds in self._datasets():
            ds.resize(capacity, axis=0)
        self._capacity = capacity

    def _datasets(self):
        out = [self.images, self.labels, self.filenames, self.bboxes]
        if self.source_index is not None:
            out.append(self.source_index)
        return out

    def append(self, images: np.ndarray, labels, filenames, bboxes, source_index=None) -> None:
        images = np.asarray(images, dtype=np.uint8)
        n = len(images)
        if n == 0:
            return
        start, stop = self.count, self.count + n
        self._grow(stop)
        self.images[start:stop] = images
        self.labels[start:stop] = np.asarray(labels, dtype=np.int32)
        self.filenames[start:stop] = np.array([str(f) for f in filenames], dtype=object)
        self.bboxes[start:stop] = np.asarray(bboxes, dtype=np.int32).reshape(n, 4)
        if self.source_index is not None:
            values = (
                np.full(n, -1, dtype=np.int64) if source_index is None else np.asarray(source_index, dtype=np.int64)
            )
            self.source_index[start:stop] = values
        self.count = stop

    def commit(self) -> pathlib.Path:
        for ds in self._datasets():
            if ds.maxshape[0] is None:
                ds.resize(self.count, axis=0)
            elif ds.shape[0] != self.count:  # a preallocated block: every row must have been written
                raise ValueError(f"{self.path}: {self.count} rows written into a block of {ds.shape[0]}")
        self._file.attrs["num_images"] = self.count
        self._file.close()
        return self._staged.publish()

    def abort(self) -> None:
        try:
            self._file.close()
        except Exception:
            pass
        self._staged.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
        return False


def write_hdf5_split(
    path: os.PathLike | str,
    images: np.ndarray,
    labels,
    class_names: Sequence[str],
    settings: PreprocessSettings,
    filenames=None,
    bboxes=None,
    split: str = "",
    source_index=None,
) -> pathlib.Path:
    """Write a whole split in one call (small sets, tests); large sets stream through HDF5SplitWriter."""
    n = len(images)
    filenames = filenames if filenames is not None else [f"image_{i:06d}" for i in range(n)]
    size = int(settings.image_size)
    bboxes = bboxes if bboxes is not None else np.tile([0, 0, size, size], (n, 1))
    with HDF5SplitWriter(
        path, class_names, settings, split=split, with_source_index=source_index is not None, expected_rows=n
    ) as writer:
        writer.append(images, labels, filenames, bboxes, source_index)
    return pathlib.Path(path)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    path: pathlib.Path
    num_images: int
    image_size: int
    class_names: tuple[str, ...]
    settings: PreprocessSettings
    has_source_index: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _decode_strings(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def read_dataset_info(path: os.PathLike | str) -> DatasetInfo:
    """Open and validate a split file; any problem is a DatasetError naming the file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        missing = [name for name in REQUIRED_DATASETS if name not in f]
        if missing:
            raise DatasetError(f"{path}: missing dataset(s) {', '.join(missing)}; not a carclf HDF5 file")
        images, labels = f["images"], f["labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise DatasetError(f"{path}: 'images' must be uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
        n = images.shape[0]
        for name in ("labels", "filenames", "bboxes"):
            if f[name].shape[0] != n:
                raise DatasetError(f"{path}: '{name}' has {f[name].shape[0]} rows but 'images' has {n}")
        class_names = tuple(_decode_strings(f["class_names"][()]))
        if not class_names:
            raise DatasetError(f"{path}: 'class_names' is empty")
        if n:
            lo, hi = int(np.min(labels[()])), int(np.max(labels[()]))
            if lo < 0 or hi >= len(class_names):
                raise DatasetError(f"{path}: labels span {lo}..{hi} but there are {len(class_names)} class names")
        attrs = {k: f.attrs[k] for k in SETTINGS_ATTRS if k in f.attrs}
        attrs.setdefault("image_size", images.shape[1])
        try:
            settings = PreprocessSettings.from_dict(attrs)
        except ValueError as exc:
            raise DatasetError(f"{path}: bad preprocessing attributes ({exc})") from None
        if settings.image_size != images.shape[1]:
            raise DatasetError(
                f"{path}: attribute image_size={settings.image_size} disagrees with images of {images.shape[1]} px"
            )
        return DatasetInfo(
            path=path,
            num_images=n,
            image_size=int(images.shape[1]),
            class_names=class_names,
            settings=settings,
            has_source_index="source_index" in f,
        )


def check_compatible(infos: Sequence[DatasetInfo]) -> None:
    """All splits of one training run must share class list and image size."""
    if not infos:
        return
    first = infos[0]
    for other in infos[1:]:
        if other.class_names != first.class_names:
            raise DatasetError(
                f"{other.path}: class list differs from {first.path} "
                f"({other.num_classes} vs {first.num_classes} classes)"
            )
        if other.image_size != first.image_size:
            raise DatasetError(
                f"{other.path}: image size {other.image_size} differs from {first.path} ({first.image_size})"
            )


def read_split(path: os.PathLike | str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a (small) split in memory; for tests and evaluation of small sets only."""
    with h5py.File(path, "r") as f:
        stop = f["images"].shape[0] if limit is None else min(limit, f["images"].shape[0])
        return f["images"][:stop], f["labels"][:stop]
