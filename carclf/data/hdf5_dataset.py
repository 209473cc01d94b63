"""The carclf HDF5 dataset: one file per split, written atomically, validated on open.

Schema (every split file, whoever writes it: preprocess, augment):
- ``images``      uint8  (N, S, S, 3) RGB, chunked one image per chunk
- ``labels``      int32  (N,) 0-based, index into ``class_names``
- ``class_names`` UTF-8 strings (C,)
- ``filenames``   UTF-8 strings (N,) source file of each image
- ``bboxes``      int32  (N, 4) x1, y1, x2, y2 in source pixels: the box the crop used (whole photo: crop=none or no box)
- ``source_index`` int64 (N,) optional: row of the source file an augmented image came from (-1: original)
- attributes: ``image_size``, ``crop``, ``crop_margin``, ``resize_mode``, ``carclf_version``, ``split``;
  ``output_set`` (preprocess): an id shared by the files one run wrote together, so that files of two runs
  are never combined by mistake (``check_compatible``)
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
from collections.abc import Sequence

import h5py
import numpy as np

from carclf.files.atomic import OutputWriteError, StagedFile, free_bytes, settle_output_set, write_error
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.version import __version__

REQUIRED_DATASETS = ("images", "labels", "class_names", "filenames", "bboxes")
SETTINGS_ATTRS = ("image_size", "crop", "crop_margin", "resize_mode")
_STR = h5py.string_dtype(encoding="utf-8")


class DatasetError(ValueError):
    """An HDF5 file that is not a usable carclf dataset; the message names the file and the problem."""


# HDF5's own bytes per row beside the pixels (labels, box, source index, the file name's heap entry and its
# chunk index entries), and per file (superblock, object headers, class names): measured on files of 32 to
# 224 px and rounded up, so that a check against free space errs on the safe side.
_ROW_OVERHEAD = 256
_FILE_OVERHEAD = 256 * 2**10


def estimated_split_bytes(rows: int, image_size: int, name_bytes: int = 0, num_classes: int = 0) -> int:
    """Bytes a split file of ``rows`` images of ``image_size`` px will take (an upper estimate);
    ``name_bytes``: the total length of the rows' file names."""
    size = int(image_size)
    return int(rows) * (size * size * 3 + _ROW_OVERHEAD) + int(name_bytes) + 64 * int(num_classes) + _FILE_OVERHEAD


class _WriteGuard(io.RawIOBase):
    """The file under an HDF5 writer (h5py's file-object driver), which never lets HDF5 see a failed write.

    libhdf5 does not recover from a write that fails half-way through its own bookkeeping (a full disk while
    it evicts metadata, grows a dataset or closes the file): ids are left half released and h5py then crashes
    the process (segmentation fault) when it frees them. Here the first failed write is kept in ``error``
    and that write and every later one land in memory pages instead, which later reads see; HDF5 stays
    consistent, the writer raises ``error`` as one line after the call that hit it, and the file is discarded.
    """

    _PAGE = 4096

    def __init__(self, path: pathlib.Path):
        super().__init__()
        self._file = open(path, "w+b", buffering=0)  # noqa: SIM115  (closed in close())
        self._pos = 0
        self.error: OSError | None = None
        self._pages: dict[int, bytearray] = {}

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = self._size() + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _size(self) -> int:
        size = os.fstat(self._file.fileno()).st_size
        if self._pages:
            size = max(size, (max(self._pages) + 1) * self._PAGE)
        return size

    def _disk_page(self, index: int) -> bytearray:
        page = bytearray(self._PAGE)
        data = os.pread(self._file.fileno(), self._PAGE, index * self._PAGE)
        page[: len(data)] = data
        return page

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if not self._pages:
            count = os.preadv(self._file.fileno(), [view], self._pos)
        else:
            count, pos = 0, self._pos
            while count < len(view):
                index, start = divmod(pos, self._PAGE)
                page = self._pages.get(index) or self._disk_page(index)
                take = min(self._PAGE - start, len(view) - count)
                view[count : count + take] = page[start : start + take]
                count, pos = count + take, pos + take
        self._pos += count
        return count

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                written = 0
                while written < len(view):
                    written += os.pwrite(self._file.fileno(), view[written:], self._pos + written)
                self._pos += written
                return written
            except OSError as exc:
                self.error = exc
        pos, done = self._pos, 0
        while done < len(view):
            index, start = divmod(pos, self._PAGE)
            page = self._pages.get(index)
            if page is None:
                page = self._pages[index] = self._disk_page(index)
            take = min(self._PAGE - start, len(view) - done)
            page[start : start + take] = view[done : done + take]
            done, pos = done + take, pos + take
        self._pos += done
        return done

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._file.fileno(), size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()
        self._pages.clear()
        super().close()


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
        initial = max(0, int(expected_rows))
        self.estimated_bytes = estimated_split_bytes(initial, size, num_classes=len(class_names)) if initial else None
        self._free_at_start = free_bytes(self.tmp_path.parent)
        self.images = self.labels = self.filenames = self.bboxes = self.source_index = None
        try:
            self._guard = _WriteGuard(self.tmp_path)
            self._file = h5py.File(self._guard, "w")
        except (OSError, RuntimeError) as exc:
            self._staged.discard()
            raise self._write_error(exc) from None
        try:
            self._create(class_names, settings, split, with_source_index, initial, attrs, preallocate_images)
            self._check()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, (OSError, RuntimeError)):
                raise self._write_error(exc) from None
            raise
        self.count = 0
        self._capacity = initial

    def _write_error(self, exc: BaseException):
        return write_error(
            self.path, exc, self.estimated_bytes, folder=self.tmp_path.parent, free_at_start=self._free_at_start
        )

    def _check(self) -> None:
        """Raise the write error the file's guard kept, if any (as one line, see _WriteGuard)."""
        if self._guard.error is not None:
            raise self._write_error(self._guard.error)

    def _create(self, class_names, settings, split, with_source_index, initial, attrs, preallocate_images) -> None:
        f = self._file
        size = int(settings.image_size)
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

    def _grow(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = max(needed, self._capacity * 2, 64)
        for ds in self._datasets():
            ds.resize(capacity, axis=0)
        self._capacity = capacity

    def _datasets(self):
        return [
            ds for ds in (self.images, self.labels, self.filenames, self.bboxes, self.source_index) if ds is not None
        ]

    def append(self, images: np.ndarray, labels, filenames, bboxes, source_index=None) -> None:
        """Add rows; a failed write (no space, ...) is an OutputWriteError line naming the file."""
        try:
            self._append(images, labels, filenames, bboxes, source_index)
        except (OSError, RuntimeError) as exc:
            raise self._write_error(self._guard.error or exc) from None
        self._check()

    def _append(self, images, labels, filenames, bboxes, source_index) -> None:
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

    def finish(self) -> pathlib.Path:
        """Complete and close the file; returns its partial path beside ``path``, ready to be renamed (alone:
        ``commit``, or with other files: ``carclf.files.atomic.commit_output_set``)."""
        for ds in self._datasets():
            if ds.maxshape[0] is None:
                ds.resize(self.count, axis=0)
            elif ds.shape[0] != self.count:  # a preallocated block: every row must have been written
                raise ValueError(f"{self.path}: {self.count} rows written into a block of {ds.shape[0]}")
        try:
            self._file.attrs["num_images"] = self.count
            self._file.close()
            self._check()
            self._guard.close()
            return self._staged.land()
        except (OSError, RuntimeError) as exc:
            raise self._write_error(self._guard.error or exc) from None

    def commit(self) -> pathlib.Path:
        self.finish()
        try:
            return self._staged.publish()
        except OSError as exc:
            raise self._write_error(exc) from None

    def abort(self) -> None:
        """Close and remove the partial file (after a failed write too: HDF5 never saw it, see _WriteGuard)."""
        try:
            self._file.close()
        except Exception:
            pass
        self.images = self.labels = self.filenames = self.bboxes = self.source_index = None
        self._guard.close()
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
    output_set: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _decode_strings(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def read_dataset_info(path: os.PathLike | str) -> DatasetInfo:
    """Open and validate a split file; any problem is a DatasetError naming the file."""
    path = pathlib.Path(path)
    try:
        settle_output_set(path.parent)  # a set being committed (or whose commit was killed) is made whole first
    except OSError as exc:
        detail = str(exc) if isinstance(exc, OutputWriteError) else f"{path.parent}: {exc.strerror or exc}"
        raise DatasetError(f"{detail} (finishing an interrupted commit of the files there)") from None
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
            output_set=_decode_strings([f.attrs.get("output_set", "")])[0],
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
    written_together: dict[pathlib.Path, DatasetInfo] = {}
    for info in infos:
        if not info.output_set:
            continue
        folder = info.path.resolve().parent
        seen = written_together.setdefault(folder, info)
        if seen.output_set != info.output_set:
            raise DatasetError(
                f"{info.path} and {seen.path} were written by different preprocess runs; run preprocess again"
            )


def read_split(path: os.PathLike | str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a (small) split in memory; for tests and evaluation of small sets only."""
    with h5py.File(path, "r") as f:
        stop = f["images"].shape[0] if limit is None else min(limit, f["images"].shape[0])
        return f["images"][:stop], f["labels"][:stop]
