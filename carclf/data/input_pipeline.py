"""Stream uint8 batches from one or several carclf HDF5 files into ``tf.data``, shuffled, never loaded whole.

Shuffling without reading the dataset whole: the rows of all files are cut into contiguous blocks of
``block_size`` images; every epoch the blocks are put in a random order (seeded by ``seed`` and the epoch
number), ``window_blocks`` consecutive blocks of that order are read with one contiguous h5py read each,
their rows are shuffled together and cut into batches. Each row is read exactly once per epoch, orders differ
between epochs, and the same (seed, epoch) always gives the same order. Memory held: one window
(``block_size * window_blocks`` images) plus the prefetched batches, whatever the size of the files.

Images stay uint8 all the way to the model (which casts and normalises inside). ``train`` augments inside
the training step (``carclf.training.online_augmentation``), so this stream stays a cheap uint8 reader that can
feed an accelerator; ``augment=True`` runs the same ops here instead, for callers that want them on the CPU.

Public API:
- ``HDF5Source(paths)``: validated files (``read_dataset_info`` + ``check_compatible``), row counts, classes.
- ``epoch_order(num_rows_per_file, epoch, seed, block_size, window_blocks)``: the row order of one epoch.
- ``make_dataset(source, batch_size, shuffle=True, seed=0, start_epoch=0, epochs=1, augment=False, ...)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Iterator, Sequence

import h5py
import numpy as np

from carclf.data.hdf5_dataset import DatasetInfo, check_compatible, read_dataset_info

DEFAULT_BLOCK_SIZE = 64
DEFAULT_WINDOW_BLOCKS = 16


def split_paths(paths) -> list[pathlib.Path]:
    """``"a.h5,b.h5"`` or a list of paths -> list of Paths (empty entries dropped)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = str(paths).split(",")
    return [pathlib.Path(str(p).strip()) for p in paths if str(p).strip()]


def absolute_paths(paths) -> str:
    """``"a.h5,b.h5"`` with every entry made absolute against this process's working directory (Spark tasks
    elsewhere, e.g. a Connect server's Python workers, resolve a relative path against theirs)."""
    return ",".join(str(path.absolute()) for path in split_paths(paths))


@dataclasses.dataclass
class HDF5Source:
    """One logical dataset made of one or several HDF5 split files with the same classes and image size."""

    infos: list[DatasetInfo]

    @classmethod
    def open(cls, paths) -> HDF5Source:
        infos = [read_dataset_info(p) for p in split_paths(paths)]
        if not infos:
            raise ValueError("no HDF5 file given")
        check_compatible(infos)
        return cls(infos)

    @property
    def paths(self) -> list[pathlib.Path]:
        return [info.path for info in self.infos]

    @property
    def rows_per_file(self) -> list[int]:
        return [info.num_images for info in self.infos]

    @property
    def num_images(self) -> int:
        return sum(self.rows_per_file)

    @property
    def image_size(self) -> int:
        return self.infos[0].image_size

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.infos[0].class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def settings(self):
        return self.infos[0].settings

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.num_images / batch_size)

    def global_index(self, file_index: int, row: np.ndarray) -> np.ndarray:
        offsets = np.cumsum([0] + self.rows_per_file)
        return offsets[file_index] + row

    def read_rows(self, global_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of a few rows by global index (galleries); reads only those rows."""
        global_indices = np.asarray(global_indices, dtype=np.int64)
        offsets = np.cumsum([0] + self.rows_per_file)
        size = self.image_size
        images = np.zeros((len(global_indices), size, size, 3), np.uint8)
        labels = np.zeros(len(global_indices), np.int32)
        for file_index, info in enumerate(self.infos):
            mask = (global_indices >= offsets[file_index]) & (global_indices < offsets[file_index + 1])
            if not mask.any():
                continue
            rows = global_indices[mask] - offsets[file_index]
            order = np.argsort(rows)
            with h5py.File(info.path, "r") as f:
                # h5py fancy indexing needs increasing indices.
                picked_images = f["images"][rows[order].tolist()]
                picked_labels = f["labels"][rows[order].tolist()]
            target = np.flatnonzero(mask)[order]
            images[target] = picked_images
            labels[target] = picked_labels
        return images, labels


def _blocks(rows_per_file: Sequence[int], block_size: int) -> np.ndarray:
    """(file, start, stop) of every contiguous block; blocks never cross file boundaries."""
    blocks = []
    for file_index, rows in enumerate(rows_per_file):
        for start in range(0, rows, block_size):
            blocks.append((file_index, start, min(rows, start + block_size)))
    return np.asarray(blocks, dtype=np.int64).reshape(-1, 3)


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), 0x6361_7263])  # "carc": a fixed salt


def epoch_windows(
    rows_per_file: Sequence[int],
    epoch: int,
    seed: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    window_blocks: int = DEFAULT_WINDOW_BLOCKS,
    shuffle: bool = True,
):
    """Yield (blocks of the window, permutation of the window's rows) for one epoch, in reading order."""
    blocks = _blocks(rows_per_file, block_size)
    rng = _epoch_rng(seed, epoch)
    if shuffle:
        blocks = blocks[rng.permutation(len(blocks))]
    window_blocks = max(1, int(window_blocks))
    for start in range(0, len(blocks), window_blocks):
        window = blocks[start : start + window_blocks]
        rows = int(np.sum(window[:, 2] - window[:, 1]))
        permutation = rng.permutation(rows) if shuffle else np.arange(rows)
        yield window, permutation


def epoch_order(
    rows_per_file: Sequence[int],
    epoch: int,
    seed: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    window_blocks: int = DEFAULT_WINDOW_BLOCKS,
    shuffle: bool = True,
) -> np.ndarray:
    """The global row indices of one epoch in the order ``make_dataset`` yields them."""
    offsets = np.cumsum([0] + list(rows_per_file))
    out = []
    for window, permutation in epoch_windows(rows_per_file, epoch, seed, block_size, window_blocks, shuffle):
        indices = np.concatenate([np.arange(offsets[f] + a, offsets[f] + b) for f, a, b in window])
        out.append(indices[permutation])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class _BatchReader:
    """The Python generator behind the dataset: reads windows with contiguous h5py reads, yields batches."""

    def __init__(
        self,
        source: HDF5Source,
        batch_size: int,
        shuffle: bool,
        seed: int,
        block_size: int,
        window_blocks: int,
        with_indices: bool,
    ):
        self.source = source
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.block_size = int(block_size)
        self.window_blocks = int(window_blocks)
        self.with_indices = with_indices

    def __call__(self, epoch) -> Iterator[tuple]:
        epoch = int(epoch)
        offsets = np.cumsum([0] + self.source.rows_per_file)
        files = [h5py.File(path, "r") for path in self.source.paths]
        try:
            pending_images, pending_labels, pending_index = [], [], []
            pending = 0
            for window, permutation in epoch_windows(
                self.source.rows_per_file, epoch, self.seed, self.block_size, self.window_blocks, self.shuffle
            ):
                images = np.concatenate([files[f]["images"][a:b] for f, a, b in window])
                labels = np.concatenate([files[f]["labels"][a:b] for f, a, b in window]).astype(np.int32)
                index = np.concatenate([np.arange(offsets[f] + a, offsets[f] + b) for f, a, b in window])
                images, labels, index = images[permutation], labels[permutation], index[permutation]
                # Carry the tail of a window into the next one: every batch but the last one is full.
                pending_images.append(images)
                pending_labels.append(labels)
                pending_index.append(index)
                pending += len(labels)
                if pending < self.batch_size:
                    continue
                images = np.concatenate(pending_images)
                labels = np.concatenate(pending_labels)
                index = np.concatenate(pending_index)
                full = (len(labels) // self.batch_size) * self.batch_size
                for start in range(0, full, self.batch_size):
                    yield self._batch(
                        images[start : start + self.batch_size],
                        labels[start : start + self.batch_size],
                        index[start : start + self.batch_size],
                    )
                pending_images, pending_labels, pending_index = [images[full:]], [labels[full:]], [index[full:]]
                pending = len(labels) - full
            if pending:
                yield self._batch(
                    np.concatenate(pending_images), np.concatenate(pending_labels), np.concatenate(pending_index)
                )
        finally:
            for f in files:
                f.close()

    def _batch(self, images, labels, index):
        if self.with_indices:
            return images, labels, index.astype(np.int64)
        return images, labels


def make_dataset(
    source: HDF5Source | str | Sequence[str],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    start_epoch: int = 0,
    epochs: int | None = 1,
    augment: bool = False,
    augment_strength: float = 1.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    window_blocks: int = DEFAULT_WINDOW_BLOCKS,
    prefetch: int = 2,
    with_indices: bool = False,
):
    """A ``tf.data.Dataset`` of (uint8 images (B, S, S, 3), int32 labels (B,)) batches.

    Epochs ``start_epoch .. start_epoch + epochs - 1`` follow each other in one dataset (``epochs=None``:
    forever), so Keras ``fit(..., steps_per_epoch=source.steps(batch_size))`` sees epoch ``e``'s order in
    epoch ``e``, also after a resume. ``with_indices`` adds the global row index of every image (tests).
    """
    import tensorflow as tf

    if not isinstance(source, HDF5Source):
        source = HDF5Source.open(source)
    size = source.image_size
    reader = _BatchReader(source, batch_size, shuffle, seed, block_size, window_blocks, with_indices)
    signature = (
        tf.TensorSpec([None, size, size, 3], tf.uint8),
        tf.TensorSpec([None], tf.int32),
    )
    if with_indices:
        signature = signature + (tf.TensorSpec([None], tf.int64),)
    if epochs is None:
        epoch_numbers = tf.data.Dataset.range(start_epoch, 2**62)
    else:
        epoch_numbers = tf.data.Dataset.range(start_epoch, start_epoch + int(epochs))
    dataset = epoch_numbers.flat_map(
        lambda epoch: tf.data.Dataset.from_generator(reader, output_signature=signature, args=(epoch,))
    )
    if epochs is not None:
        # A known length: Keras shows progress against it and never probes past the end.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(source.steps(batch_size) * int(epochs)))
    if augment:
        from carclf.training.online_augmentation import AugmentationRanges, augment_images, step_seed

        ranges = AugmentationRanges.for_strength(augment_strength)

        def augment_batch(batch_number, batch):
            images, *rest = batch
            return (
                augment_images(images, step_seed(seed, batch_number + start_epoch * 2**20, replica=0), ranges),
                *rest,
            )

        dataset = dataset.enumerate().map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.experimental_deterministic = True
    return dataset.with_options(options).prefetch(prefetch)
