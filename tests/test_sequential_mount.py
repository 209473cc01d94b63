"""Outputs on a mount that takes only sequential writes (Unity Catalog Volumes, DBFS): built locally, copied once.

The mount is real: a FUSE file system (``helpers_seqfs``) that refuses any write not at the end of its file,
as Databricks' FUSE does. HDF5 cannot be built on it in place (the first test shows it); every writer must
still land a complete, correct file there.
"""

import pathlib
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from carclf.files.atomic import STAGING_DIR_ENV, STAGING_ENV, refuses_random_writes
from helpers_seqfs import fuse_missing, sequential_only_mount

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A mounted sequential-only folder (like /Volumes/<catalog>/<schema>/<volume>)."""
    if reason := fuse_missing():
        pytest.skip(reason)
    with sequential_only_mount(tmp_path_factory.mktemp("volume")) as mountpoint:
        yield mountpoint


@pytest.fixture(autouse=True)
def private_staging(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    monkeypatch.setenv(STAGING_DIR_ENV, str(staging))
    monkeypatch.delenv(STAGING_ENV, raising=False)
    return staging


def _split(path, n=12, size=32, seed=0):
    from carclf.data.hdf5_dataset import write_hdf5_split
    from carclf_flavor.images import PreprocessSettings

    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return write_hdf5_split(path, images, np.arange(n) % 3, ["a", "b", "c"], PreprocessSettings(image_size=size))


def test_the_mount_refuses_an_hdf5_file_built_in_place(volume):
    # In a child process: libhdf5 can crash the interpreter after a failed write.
    script = (
        "import h5py, numpy as np, sys\n"
        "with h5py.File(sys.argv[1], 'w') as f:\n"
        "    f.create_dataset('images', data=np.zeros((64, 32, 32, 3), np.uint8), chunks=(1, 32, 32, 3))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(volume / "in_place.h5")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "Operation not supported" in result.stderr or "errno = 95" in result.stderr, result.stderr[-2000:]


def test_which_folders_are_staged(volume, tmp_path, monkeypatch):
    assert refuses_random_writes(volume) and refuses_random_writes(volume / "not" / "made" / "yet")
    assert not refuses_random_writes(tmp_path)
    assert refuses_random_writes("/Volumes/main/default/cars") and refuses_random_writes("/dbfs/tmp/cars")
    monkeypatch.setenv(STAGING_ENV, "always")
    assert refuses_random_writes(tmp_path)
    monkeypatch.setenv(STAGING_ENV, "sometimes")
    with pytest.raises(ValueError, match="CARCLF_LOCAL_STAGING must be auto, always or never"):
        refuses_random_writes(tmp_path)


def test_preprocess_lands_the_same_bytes_on_the_mount_as_on_local_disk(volume, tmp_path, private_staging):
    from carclf.data.sample_data import generate_sample_dataset
    from entry_points.preprocess import preprocess

    source = generate_sample_dataset(tmp_path / "stanford", seed=5, num_classes=3, train_per_class=4, test_per_class=2)
    common = dict(data_dir=source, image_size=32, workers=1)
    local = preprocess(output_dir=tmp_path / "local", **common)
    mounted = preprocess(output_dir=volume / "processed", **common)
    for split in ("train", "val", "test"):
        assert pathlib.Path(mounted[split]).parent == volume / "processed"
        assert pathlib.Path(mounted[split]).read_bytes() == pathlib.Path(local[split]).read_bytes()
    assert sorted(p.name for p in (volume / "processed").iterdir() if p.name.startswith(".")) == []
    assert list(private_staging.iterdir()) == []  # the local copies are gone


def test_augment_output_lands_on_the_mount(volume, tmp_path):
    from carclf.augmentation.in_process import augment_in_process

    source = _split(tmp_path / "train.h5", n=6)
    common = dict(copies=2, keep_original=True, ops="flip", seed=3)
    local = augment_in_process(source, tmp_path / "aug.h5", **common)["output"]
    mounted = augment_in_process(source, volume / "aug" / "train_aug.h5", **common)["output"]
    with h5py.File(local) as a, h5py.File(mounted) as b:
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name][()], b[name][()])


def test_a_checkpoint_lands_on_the_mount_and_resumes(volume):
    import keras

    from carclf.training.checkpoints import read_latest_checkpoint, save_checkpoint

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=1, verbose=0)
    folder = volume / "checkpoints"
    save_checkpoint(folder, model, {"completed_epochs": 1})
    found = read_latest_checkpoint(folder)
    assert found is not None and found[1]["completed_epochs"] == 1
    fresh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    fresh.load_weights(str(found[0] / "model.weights.h5"))
    for mine, theirs in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    shutil.rmtree(folder)
