"""Writers on a full disk: a real small tmpfs (root only), each writer in a subprocess so that a crash cannot
take pytest with it. What must hold at every size: exit code 0 or 2 (never a signal), at most one ``error:``
line and no traceback, and the folder holds the earlier complete output or the new complete one, never a mix."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import h5py
import pytest

from carclf.data.sample_data import generate_sample_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLIT_FILES = {"train.h5", "val.h5", "test.h5", "splits.json"}


def _not_root_reason() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CI runs as root)"
    return None


pytestmark = pytest.mark.skipif(_not_root_reason() is not None, reason=_not_root_reason() or "")


@contextlib.contextmanager
def tmpfs(folder: pathlib.Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _env(mlflow_store) -> dict:
    return dict(
        os.environ,
        MLFLOW_TRACKING_URI=mlflow_store,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )


def _run(args, env) -> tuple[int, list[str], str]:
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in done.stderr and "Fatal Python error" not in done.stderr, done.stderr[-3000:]
    assert done.returncode in (0, 2), (done.returncode, done.stderr[-3000:])
    assert len(errors) == (0 if done.returncode == 0 else 1), done.stderr[-3000:]
    return done.returncode, errors, done.stderr


def _split_set(folder: pathlib.Path) -> tuple[str, ...] | None:
    """The class list of the complete split set in ``folder``; None when it is empty; fails on anything else."""
    names = {p.name for p in folder.iterdir()} if folder.exists() else set()
    if not names:
        return None
    assert names == SPLIT_FILES, names  # no partials, no missing split
    manifest = json.loads((folder / "splits.json").read_text())
    for split in ("train", "val", "test"):
        with h5py.File(folder / f"{split}.h5", "r") as f:
            assert f.attrs["output_set"] == manifest["output_set"], split
            assert int(f.attrs["num_images"]) == manifest["images"][split] == f["images"].shape[0]
            assert [n.decode() for n in f["class_names"][()]] == manifest["class_names"]
    return tuple(manifest["class_names"])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    small = dict(train_per_class=10, test_per_class=4, min_width=96, max_width=160)
    return (
        generate_sample_dataset(root / "old", seed=1, num_classes=3, **small),
        generate_sample_dataset(root / "new", seed=2, num_classes=4, **small),
    )


# 64 px: the earlier set needs about 1.3 MB, the new one about 1.5 MB beside it.
@pytest.mark.parametrize("size", ["512k", "2m", "4m"])
def test_preprocess_on_a_full_disk_leaves_a_whole_split_set(size, sources, tmp_path, mlflow_store):
    old_photos, new_photos = sources
    env = _env(mlflow_store)
    with tmpfs(tmp_path / "disk", size) as disk:
        out = disk / "processed"
        common = ["-m", "entry_points.preprocess", "--output-dir", str(out), "--image-size", "64", "--workers", "1"]
        rc, errors, _ = _run([*common, "--data-dir", str(old_photos)], env)
        earlier = _split_set(out)
        assert (earlier is None) == (rc != 0)
        rc, errors, _ = _run([*common, "--data-dir", str(new_photos)], env)
        left = _split_set(out)
        if rc == 0:
            assert left is not None and len(left) == 4
        else:
            assert left == earlier  # the earlier set, untouched
            assert f"not enough space in {out}" in errors[0] and "MB free" in errors[0], errors
    expected = {"512k": (None, None), "2m": (3, 3), "4m": (3, 4)}[size]
    assert (earlier and len(earlier), left and len(left)) == expected


_WRITER = """
import sys, numpy as np
from carclf_flavor.images import PreprocessSettings
from carclf.data.hdf5_dataset import HDF5SplitWriter
from carclf.files.atomic import OutputWriteError
rows, expected = int(sys.argv[2]), int(sys.argv[3])
try:
    with HDF5SplitWriter(sys.argv[1], ["a", "b"], PreprocessSettings(image_size=64), expected_rows=expected) as w:
        for i in range(0, rows, 8):
            w.append(np.full((8, 64, 64, 3), i % 255, np.uint8), [0] * 8, [f"p{i + j}" for j in range(8)], [[0, 0, 1, 1]] * 8)
except OutputWriteError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("rows", [8, 64, 72, 96, 160, 800])
@pytest.mark.parametrize("preallocated", [False, True])
def test_hdf5_writer_out_of_space_is_one_line_and_no_crash(rows, preallocated, tmp_path, mlflow_store):
    """No up-front check here: HDF5 itself runs into the full disk, while writing rows, growing the datasets
    or closing the file, depending on the size; never a segfault, one line, no file left behind."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        target = disk / "x.h5"
        rc, errors, _ = _run(
            ["-c", _WRITER, str(target), str(rows), str(rows if preallocated else 0)], _env(mlflow_store)
        )
        left = sorted(p.name for p in disk.iterdir())
        if rc == 0:
            assert left == ["x.h5"]
            with h5py.File(target, "r") as f:
                assert f["images"].shape[0] == rows
        else:
            assert left == [], left
            assert f"{target}: no space left on device" in errors[0] and "was free in" in errors[0], errors
    assert (rc == 0) == (rows <= 64)


def test_augment_refuses_a_disk_too_small_and_keeps_the_earlier_output(sources, tmp_path, mlflow_store):
    from entry_points.preprocess import preprocess

    splits = preprocess(data_dir=str(sources[0]), output_dir=str(tmp_path / "splits"), image_size=64, workers=1)
    env = _env(mlflow_store)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        earlier = disk / "train_aug.h5"
        earlier.write_bytes(b"an earlier complete output")
        rc, errors, _ = _run(
            ["-m", "entry_points.augment", "--input", str(splits["train"]), "--output", str(earlier), "--copies", "4"],
            env,
        )
        assert rc == 2 and f"not enough space in {disk} for train_aug.h5" in errors[0], errors
        assert sorted(p.name for p in disk.iterdir()) == ["train_aug.h5"]
        assert earlier.read_bytes() == b"an earlier complete output"


def test_a_commit_killed_half_way_is_finished_by_the_next_reader(tmp_path):
    """A run killed between the renames of its set (journal written, some files renamed) leaves the new set
    to be finished: the next reader completes it before opening any file, so it never reads a mix."""
    from carclf.data.hdf5_dataset import read_dataset_info
    from carclf.data.preprocessing import MANIFEST
    from entry_points.preprocess import preprocess

    made = preprocess(data_dir="", output_dir=str(tmp_path / "new"), image_size=32, workers=1)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    renames = []
    for name in [*(p.name for p in made.values()), MANIFEST]:
        partial = f".{name}.partial-{dead.pid}"
        (tmp_path / "new" / name).rename(out / partial)
        renames.append([partial, name])
    (out / renames[0][0]).rename(out / renames[0][1])  # the first rename happened, then the run was killed
    (out / "val.h5").write_bytes(b"an earlier val.h5")  # what the killed run was about to replace
    (out / f".carclf-commit-{dead.pid}.json").write_text(json.dumps({"renames": renames}))
    info = read_dataset_info(out / "val.h5")
    assert info.num_images > 0
    assert _split_set(out) is not None
