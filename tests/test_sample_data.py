"""The sample generator writes the Stanford Cars layout, readable the way the original is read."""

import hashlib
import pathlib

import numpy as np
import pytest
import scipy.io
from PIL import Image

from carclf.data import sample_data
from carclf.data.sample_data import (
    class_names,
    default_sample_dir,
    ensure_sample_data,
    generate_sample_dataset,
)

TINY = dict(num_classes=3, train_per_class=3, test_per_class=2, min_width=96, max_width=200)


def tree_digest(root: pathlib.Path) -> dict:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_sample_dataset(tmp_path_factory.mktemp("sample") / "cars", seed=3, **TINY)


def test_layout_files(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == [
        "cars_test",
        "cars_test_annos_withlabels.mat",
        "cars_train",
        "devkit",
    ]
    assert sorted(p.name for p in (tiny / "devkit").iterdir()) == ["cars_meta.mat", "cars_train_annos.mat"]
    assert len(list((tiny / "cars_train").glob("*.jpg"))) == 9
    assert len(list((tiny / "cars_test").glob("*.jpg"))) == 6


def test_meta_reads_like_the_original(tiny):
    # The article: class_names = loadmat('devkit/cars_meta.mat')['class_names']; name = class_names[0][i][0]
    meta = scipy.io.loadmat(str(tiny / "devkit" / "cars_meta.mat"))
    names = meta["class_names"]
    assert names.shape == (1, 3)
    assert [names[0][i][0] for i in range(3)] == class_names(3)
    assert len(set(class_names(20))) == 20


@pytest.mark.parametrize(
    "annos, folder, per_class",
    [
        ("devkit/cars_train_annos.mat", "cars_train", 3),
        ("cars_test_annos_withlabels.mat", "cars_test", 2),
    ],
)
def test_annotations_read_like_the_original(tiny, annos, folder, per_class):
    # foamliu/Car-Recognition: annotations = np.transpose(loadmat(...)['annotations']);
    # bbox_x1 = annotation[0][0][0][0] ... class_id = annotation[0][4][0][0]; fname = annotation[0][5][0]
    annotations = scipy.io.loadmat(str(tiny / annos))["annotations"]
    assert annotations.shape == (1, 3 * per_class)
    assert annotations.dtype.names == ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    classes = []
    for annotation in np.transpose(annotations):
        x1, y1, x2, y2 = (int(annotation[0][k][0][0]) for k in range(4))
        class_id = int(annotation[0][4][0][0])
        fname = str(annotation[0][5][0])
        classes.append(class_id)
        width, height = Image.open(tiny / folder / fname).size
        assert TINY["min_width"] <= width <= TINY["max_width"]
        # 1-based inclusive MATLAB coordinates inside the photo.
        assert 1 <= x1 < x2 <= width and 1 <= y1 < y2 <= height
        assert (x2 - x1) >= 0.4 * width
    assert sorted(set(classes)) == [1, 2, 3]  # 1-based
    assert np.bincount(classes).tolist() == [0] + [per_class] * 3  # balanced per class


def test_photos_are_jpegs_of_varied_size(tiny):
    sizes = {Image.open(p).size for p in (tiny / "cars_train").glob("*.jpg")}
    assert all(Image.open(p).format == "JPEG" for p in (tiny / "cars_train").glob("*.jpg"))
    assert len(sizes) >= 5
    assert len({round(h / w, 2) for w, h in sizes}) >= 3


def test_colour_does_not_give_the_class_away(tiny):
    # The same class gets different body colours: mean colour inside the box varies within a class.
    annotations = np.transpose(scipy.io.loadmat(str(tiny / "devkit" / "cars_train_annos.mat"))["annotations"])
    by_class = {}
    for a in annotations:
        x1, y1, x2, y2 = (int(a[0][k][0][0]) for k in range(4))
        image = np.asarray(Image.open(tiny / "cars_train" / str(a[0][5][0])).convert("RGB"))
        by_class.setdefault(int(a[0][4][0][0]), []).append(image[y1 - 1 : y2, x1 - 1 : x2].reshape(-1, 3).mean(0))
    for means in by_class.values():
        assert np.ptp(np.stack(means), axis=0).max() > 15


def test_same_seed_same_bytes_other_seed_other_photos(tmp_path, tiny):
    again = generate_sample_dataset(tmp_path / "again", seed=3, **TINY)
    assert tree_digest(again) == tree_digest(tiny)
    other = generate_sample_dataset(tmp_path / "other", seed=4, **TINY)
    assert tree_digest(other)["cars_train/00001.jpg"] != tree_digest(tiny)["cars_train/00001.jpg"]


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        generate_sample_dataset(tmp_path / "x", num_classes=0)
    with pytest.raises(ValueError, match="min_width"):
        generate_sample_dataset(tmp_path / "x", min_width=500, max_width=400)


def test_cli(tmp_path, capsys):
    rc = sample_data.main(
        [
            "--output",
            str(tmp_path / "cli"),
            "--num-classes",
            "2.0",
            "--train-per-class",
            "1",
            "--test-per-class",
            "1",
            "--min-width",
            "96",
            "--max-width",
            "128",
        ]
    )
    assert rc == 0
    assert len(list((tmp_path / "cli" / "cars_train").glob("*.jpg"))) == 2
    rc = sample_data.main(["--output", str(tmp_path / "bad"), "--num-classes", "99"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: num_classes")


def test_cache_generates_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("CARCLF_CACHE_DIR", str(tmp_path / "cache"))
    params = dict(TINY, num_classes=2, train_per_class=1, test_per_class=1)
    first = ensure_sample_data(**params)
    assert first == default_sample_dir(**{**sample_data.DEFAULTS, **params})
    assert first.parent == tmp_path / "cache" and "sample-v" in first.name
    stamp = (first / "cars_train" / "00001.jpg").stat().st_mtime_ns
    assert ensure_sample_data(**params) == first
    assert (first / "cars_train" / "00001.jpg").stat().st_mtime_ns == stamp  # not regenerated
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temp folder left


def test_cache_ignores_an_incomplete_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("CARCLF_CACHE_DIR", str(tmp_path / "cache"))
    params = dict(TINY, num_classes=2, train_per_class=1, test_per_class=1)
    target = default_sample_dir(**{**sample_data.DEFAULTS, **params})
    (target / "cars_train").mkdir(parents=True)  # e.g. left by a foreign tool: no completion marker
    result = ensure_sample_data(**params)
    assert result == target and len(list((target / "cars_train").glob("*.jpg"))) == 2


def test_cache_removes_what_a_killed_generation_left(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("CARCLF_CACHE_DIR", str(tmp_path / "cache"))
    params = dict(TINY, num_classes=2, train_per_class=1, test_per_class=1)
    target = default_sample_dir(**{**sample_data.DEFAULTS, **params})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = target.parent / f".{target.name}.partial-{int(dead.stdout)}"  # a generation killed half-way
    (leftover / "cars_train").mkdir(parents=True)
    (leftover / "cars_train" / "00001.jpg").write_bytes(b"half a photo")
    assert ensure_sample_data(**params) == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
