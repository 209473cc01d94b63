"""The HDF5 -> tf.data stream: each row once per epoch, shuffled across files, seeded, uint8 end to end."""

import numpy as np
import pytest

from carclf.data.hdf5_dataset import DatasetError, write_hdf5_split
from carclf.data.input_pipeline import HDF5Source, epoch_order, make_dataset
from carclf_flavor.images import PreprocessSettings

SIZE = 16  # the pipeline does not care about the network's minimum size
CLASSES = ["a", "b", "c", "d", "e"]


def _write_indexed(path, start, count, with_source_index=False, size=SIZE, classes=CLASSES):
    """Each image carries its global row index in its first pixel, so the stream can be checked row by row."""
    index = np.arange(start, start + count)
    images = np.zeros((count, size, size, 3), np.uint8)
    images[:, 0, 0, 0] = index % 256
    images[:, 0, 0, 1] = index // 256
    return write_hdf5_split(
        path,
        images,
        index % len(classes),
        classes,
        PreprocessSettings(image_size=size),
        source_index=np.full(count, -1) if with_source_index else None,
    )


def _decoded_index(images):
    images = np.asarray(images)
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


@pytest.fixture
def two_files(tmp_path):
    a = _write_indexed(tmp_path / "a.h5", 0, 300)
    # An augmented file carries an extra `source_index` dataset: the pipeline must ignore it.
    b = _write_indexed(tmp_path / "b.h5", 300, 157, with_source_index=True)
    return f"{a},{b}"


def _stream(paths, epochs, seed=0, batch_size=32, **kwargs):
    dataset = make_dataset(paths, batch_size, seed=seed, epochs=epochs, with_indices=True, **kwargs)
    batches = list(dataset.as_numpy_iterator())
    for images, labels, indices in batches:
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(_decoded_index(images), indices)  # pixels, labels and index stay together
        np.testing.assert_array_equal(labels, indices % len(CLASSES))
    return batches


def test_every_row_exactly_once_per_epoch_and_orders_differ(two_files):
    total = 457
    batches = _stream(two_files, epochs=2, block_size=16, window_blocks=4)
    order = np.concatenate([b[2] for b in batches])
    assert len(order) == 2 * total
    first, second = order[:total], order[total:]
    assert sorted(first) == list(range(total))
    assert sorted(second) == list(range(total))
    assert np.mean(first != second) > 0.9
    # Shuffled across the whole set: the first batch draws from both files, not from one contiguous stretch.
    assert np.ptp(first[:32]) > 100
    # All batches full except the last of each epoch.
    sizes = [len(b[1]) for b in batches]
    assert sizes.count(32) == len(sizes) - 2


def test_seeded_and_reproducible(two_files):
    run_a = np.concatenate([b[2] for b in _stream(two_files, epochs=1, seed=7)])
    run_b = np.concatenate([b[2] for b in _stream(two_files, epochs=1, seed=7)])
    run_c = np.concatenate([b[2] for b in _stream(two_files, epochs=1, seed=8)])
    np.testing.assert_array_equal(run_a, run_b)
    assert np.mean(run_a != run_c) > 0.9
    np.testing.assert_array_equal(run_a, epoch_order([300, 157], epoch=0, seed=7))


def test_start_epoch_gives_that_epochs_order(two_files):
    """A resumed run that starts at epoch 3 sees exactly the order epoch 3 would have had."""
    resumed = np.concatenate([b[2] for b in _stream(two_files, epochs=1, seed=3, start_epoch=3)])
    full = np.concatenate([b[2] for b in _stream(two_files, epochs=4, seed=3)])
    np.testing.assert_array_equal(resumed, full[3 * 457 :])


def test_unshuffled_is_file_order(two_files):
    order = np.concatenate([b[2] for b in _stream(two_files, epochs=1, shuffle=False)])
    np.testing.assert_array_equal(order, np.arange(457))


def test_online_augmentation_keeps_uint8_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3)).astype(np.uint8)
    path = write_hdf5_split(tmp_path / "aug.h5", images, np.arange(40) % 5, CLASSES, PreprocessSettings(image_size=32))
    plain = list(make_dataset(path, 8, shuffle=False, with_indices=True).as_numpy_iterator())
    augmented = list(make_dataset(path, 8, shuffle=False, augment=True, with_indices=True).as_numpy_iterator())
    changed = 0
    for (x0, y0, i0), (x1, y1, i1) in zip(plain, augmented):
        assert x1.dtype == np.uint8 and x1.shape == x0.shape
        np.testing.assert_array_equal(y0, y1)
        np.testing.assert_array_equal(i0, i1)
        changed += int(np.any(x0 != x1))
    assert changed == len(plain)


def test_mismatched_files_are_refused(tmp_path):
    a = _write_indexed(tmp_path / "a.h5", 0, 10)
    other_classes = _write_indexed(tmp_path / "b.h5", 0, 10, classes=["x", "y"])
    other_size = _write_indexed(tmp_path / "c.h5", 0, 10, size=24)
    with pytest.raises(DatasetError, match="class list differs"):
        HDF5Source.open(f"{a},{other_classes}")
    with pytest.raises(DatasetError, match="image size 24 differs"):
        HDF5Source.open([a, other_size])


def test_read_rows_fetches_only_requested_rows_across_files(two_files):
    source = HDF5Source.open(two_files)
    wanted = [456, 3, 301, 299]
    images, labels = source.read_rows(wanted)
    np.testing.assert_array_equal(_decoded_index(images), wanted)
    np.testing.assert_array_equal(labels, np.array(wanted) % len(CLASSES))
