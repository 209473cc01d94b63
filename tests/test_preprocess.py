"""preprocess: both layouts -> train/val/test HDF5; schema, split, determinism, atomicity, bad photos, MLflow."""

import os
import pathlib
import shutil
import subprocess
import sys

import h5py
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import carclf.data.preprocessing as preprocessing
import entry_points.preprocess as prep
from carclf.data.hdf5_dataset import read_dataset_info
from carclf.data.readers import DataLayoutError, read_dataset, stratified_split
from carclf.data.sample_data import generate_sample_dataset, write_annotations
from carclf_flavor.version import __version__
from entry_points.preprocess import preprocess

SIZE = 32
TINY = dict(num_classes=3, train_per_class=6, test_per_class=2, min_width=96, max_width=160)


@pytest.fixture(scope="module")
def stanford_src(tmp_path_factory):
    return generate_sample_dataset(tmp_path_factory.mktemp("src") / "stanford", seed=5, **TINY)


@pytest.fixture
def stanford(stanford_src, tmp_path):
    """A private copy (tests may damage it)."""
    return pathlib.Path(shutil.copytree(stanford_src, tmp_path / "stanford"))


def make_folders(stanford_root: pathlib.Path, dest: pathlib.Path, split_folders: bool) -> pathlib.Path:
    """The same photos in the folder-per-class layout (class folder names = class names)."""
    ds = read_dataset(stanford_root)
    for split, records in ds.splits.items():
        for record in records:
            parts = ([split] if split_folders else []) + [ds.class_names[record.label]]
            folder = dest.joinpath(*parts)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(record.path, folder / f"{split}_{record.path.name}")
    return dest


def run_preprocess(data_dir, out, **kwargs):
    kwargs = {"image_size": SIZE, "workers": 1, **kwargs}
    return preprocess(data_dir=data_dir, output_dir=out, **kwargs)


def the_run():
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert len(runs) == 1
    return runs[0]


def h5(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}, dict(f.attrs), f["images"].chunks


# ------------------------------------------------------------------------------------------------ readers
def test_stanford_reader(stanford):
    ds = read_dataset(stanford)
    assert ds.layout == "stanford" and ds.class_names[0] == "Sample Sedan" and len(ds.class_names) == 3
    assert len(ds.splits["train"]) == 18 and len(ds.splits["test"]) == 6
    assert ds.class_counts("train").tolist() == [6, 6, 6]
    record = ds.splits["train"][0]
    assert record.path == stanford / "cars_train" / "00001.jpg" and record.path.exists()
    assert 0 <= record.label < 3
    x1, y1, x2, y2 = record.bbox
    assert 0 <= x1 < x2 and 0 <= y1 < y2


def test_folder_readers(stanford, tmp_path):
    flat = read_dataset(make_folders(stanford, tmp_path / "flat", False), test_fraction=0.25, seed=1)
    assert flat.layout == "folders" and flat.class_names == sorted(read_dataset(stanford).class_names)
    # 8 photos per class: round(8 * 0.25) = 2 test photos per class.
    assert flat.class_counts("test").tolist() == [2, 2, 2] and flat.class_counts("train").tolist() == [6, 6, 6]
    assert all(r.bbox is None for r in flat.splits["train"])
    split = read_dataset(make_folders(stanford, tmp_path / "split", True))
    assert split.layout == "folders-split"
    assert split.class_counts("train").tolist() == [6, 6, 6] and split.class_counts("test").tolist() == [2, 2, 2]
    assert all(r.path.parts[-3] == "test" for r in split.splits["test"])


def test_stratified_split_is_per_class_and_seeded(stanford):
    records = read_dataset(stanford).splits["train"]
    kept, taken = stratified_split(records, 0.34, seed=0)
    assert sorted(r.label for r in taken) == [0, 0, 1, 1, 2, 2]
    assert set(kept).isdisjoint(taken) and len(kept) + len(taken) == len(records)
    assert stratified_split(records, 0.34, seed=0) == (kept, taken)
    assert any(stratified_split(records, 0.34, seed=s)[1] != taken for s in range(1, 6))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda root: (root / "devkit" / "cars_train_annos.mat").unlink(),
            "cars_train_annos.mat: annotation file missing",
        ),
        (lambda root: (root / "cars_test_annos_withlabels.mat").unlink(), "cars_test_annos_withlabels.mat"),
        (lambda root: shutil.rmtree(root / "cars_test"), "cars_test: image folder missing"),
        (lambda root: (root / "devkit" / "cars_meta.mat").write_bytes(b"not a mat file"), "not a readable MATLAB file"),
    ],
)
def test_stanford_layout_errors(stanford, damage, message):
    damage(stanford)
    with pytest.raises(DataLayoutError, match=message):
        read_dataset(stanford)


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DataLayoutError, match="no such folder"):
        read_dataset(tmp_path / "missing")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DataLayoutError, match="no class folders"):
        read_dataset(tmp_path / "empty_root")
    (tmp_path / "data" / "audi").mkdir(parents=True)
    (tmp_path / "data" / "bmw").mkdir()
    (tmp_path / "data" / "audi" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataLayoutError, match=r"bmw: class folder has no images"):
        read_dataset(tmp_path / "data")


def test_class_id_out_of_range(stanford):
    write_annotations(
        stanford / "devkit" / "cars_train_annos.mat",
        [{"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 20, "bbox_y2": 20, "class": 7, "fname": "00001.jpg"}],
    )
    with pytest.raises(DataLayoutError, match=r"row 1: class 7 is outside 1..3"):
        read_dataset(stanford)


# ------------------------------------------------------------------------------------------------ output
def test_schema_dtypes_attributes_and_mlflow(stanford, tmp_path):
    paths = run_preprocess(stanford, tmp_path / "out", val_fraction=0.34, crop_margin=4)
    assert set(paths) == {"train", "val", "test"} and all(p.exists() for p in paths.values())
    counts = {}
    for split, path in paths.items():
        data, attrs, chunks = h5(path)
        n = len(data["labels"])
        counts[split] = n
        assert data["images"].dtype == np.uint8 and data["images"].shape == (n, SIZE, SIZE, 3)
        assert chunks == (1, SIZE, SIZE, 3)
        assert data["labels"].dtype == np.int32 and set(data["labels"]) <= {0, 1, 2}
        assert data["bboxes"].dtype == np.int32 and data["bboxes"].shape == (n, 4)
        assert [s.decode() for s in data["class_names"]] == ["Sample Sedan", "Sample Hatchback", "Sample SUV"]
        assert attrs["image_size"] == SIZE and attrs["crop"] == "bbox" and attrs["crop_margin"] == 4
        assert attrs["resize_mode"] == "stretch" and attrs["carclf_version"] == __version__
        assert attrs["split"] == split and attrs["num_images"] == n
        assert read_dataset_info(path).num_images == n
    assert counts == {"train": 12, "val": 6, "test": 6}
    # Stratified: every class gives 2 of its 6 training photos to val.
    assert np.bincount(h5(paths["val"])[0]["labels"]).tolist() == [2, 2, 2]
    train_names = {n.decode() for n in h5(paths["train"])[0]["filenames"]}
    val_names = {n.decode() for n in h5(paths["val"])[0]["filenames"]}
    assert train_names.isdisjoint(val_names) and len(train_names | val_names) == 18
    # Stored boxes are the devkit boxes in 0-based source pixels, and the labels follow the annotations.
    truth = {r.path.name: r for r in read_dataset(stanford).splits["train"]}
    data = h5(paths["train"])[0]
    for name, label, box in zip(data["filenames"], data["labels"], data["bboxes"]):
        record = truth[pathlib.PurePath(name.decode()).name]
        assert label == record.label and tuple(box) == record.bbox

    run = the_run()
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_images"] == 12 and run.data.metrics["skipped_images"] == 0
    assert run.data.metrics["test_images"] == 6 and run.data.metrics["num_classes"] == 3
    assert run.data.params["image_size"] == str(SIZE) and run.data.params["layout"] == "stanford"
    assert run.data.tags["carclf.output.train"] == str(paths["train"])
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"class_counts.svg", "sample_crops.png", "skipped.txt", "preprocessing.json"} <= artifacts
    # The chart shows what was written: one segment per class and split, with the files' counts.
    chart = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/class_counts.svg")
    segments = {title.rsplit(" ", 1)[0]: int(title.rsplit(" ", 1)[1]) for title in svg_bar_titles(chart)}
    names = [n.decode() for n in h5(paths["train"])[0]["class_names"]]
    for split in ("train", "val", "test"):
        for label, count in enumerate(np.bincount(h5(paths[split])[0]["labels"], minlength=3)):
            assert segments.get(f"{names[label]}: {split}", 0) == count, (split, label)


def svg_bar_titles(svg: str) -> list:
    import xml.etree.ElementTree as ET

    ns = "{http://www.w3.org/2000/svg}"
    return [rect.find(f"{ns}title").text for rect in ET.fromstring(svg).iter(f"{ns}rect") if rect.get("class") == "bar"]


def test_crop_follows_the_box(stanford, tmp_path):
    # bbox crop and whole-photo output differ; the bbox crop matches prepare_photo on the file itself.
    from carclf_flavor.images import PreprocessSettings, prepare_photo

    boxed = run_preprocess(stanford, tmp_path / "boxed", val_fraction=0.0)
    whole = run_preprocess(stanford, tmp_path / "whole", val_fraction=0.0, crop="none", resize_mode="pad")
    b, w = h5(boxed["test"])[0], h5(whole["test"])[0]
    assert not np.array_equal(b["images"], w["images"])
    name = b["filenames"][0].decode()
    expected = prepare_photo((stanford / name).read_bytes(), tuple(b["bboxes"][0]), PreprocessSettings(image_size=SIZE))
    assert np.array_equal(b["images"][0], expected)
    assert h5(whole["test"])[1]["resize_mode"] == "pad"


def test_folder_per_class_end_to_end(stanford, tmp_path):
    root = make_folders(stanford, tmp_path / "flat", False)
    paths = run_preprocess(root, tmp_path / "out", test_fraction=0.25, val_fraction=0.2)
    test = h5(paths["test"])[0]
    assert np.bincount(test["labels"]).tolist() == [2, 2, 2]
    # No boxes in this layout: the stored box is the whole photo.
    from PIL import Image

    name = test["filenames"][0].decode()
    assert tuple(test["bboxes"][0]) == (0, 0, *Image.open(root / name).size)


def test_same_inputs_same_bytes_any_worker_count(stanford, tmp_path):
    one = run_preprocess(stanford, tmp_path / "one", workers=1)
    two = run_preprocess(stanford, tmp_path / "two", workers=2)
    for split in ("train", "val", "test"):
        assert one[split].read_bytes() == two[split].read_bytes()
    other = run_preprocess(stanford, tmp_path / "other", seed=1)
    assert h5(other["val"])[0]["filenames"].tolist() != h5(one["val"])[0]["filenames"].tolist()


def test_failed_run_leaves_no_output(stanford, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = preprocessing.prepare_photo

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:  # past the first split: train is complete, val is being written
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocessing, "prepare_photo", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_preprocess(stanford, out)
    assert list(out.iterdir()) == []  # no train.h5, no partial files
    assert the_run().info.status == "FAILED"


def test_bad_photos_are_skipped_counted_and_named(stanford, tmp_path):
    root = make_folders(stanford, tmp_path / "flat", False)
    good = sorted((root / "Sample SUV").glob("*.jpg"))[0].read_bytes()
    bad = {
        "Sample SUV/zero.jpg": b"",
        "Sample SUV/truncated.jpg": good[: len(good) // 2],
        "Sample Sedan/text.jpg": b"this is not a photo\n" * 20,
        "Sample Sedan/noise.png": np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes(),
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    (root / "Sample Sedan" / "notes.txt").write_text("ignored: not an image extension")
    paths = run_preprocess(root, tmp_path / "out", test_fraction=0.25, workers=2)
    total = sum(len(h5(p)[0]["labels"]) for p in paths.values())
    assert total == 24  # every good photo, none of the bad ones
    run = the_run()
    assert run.data.metrics["skipped_images"] == 4
    skipped = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/skipped.txt")
    listed = {line.split("\t")[0]: line.split("\t")[1] for line in skipped.strip().splitlines()}
    assert set(listed) == set(bad)
    assert "0 bytes" in listed["Sample SUV/zero.jpg"] and "truncated" in listed["Sample SUV/truncated.jpg"]


def test_boxes_outside_the_photo_are_clamped_or_skipped(stanford, tmp_path):
    annos = stanford / "devkit" / "cars_train_annos.mat"
    ds = read_dataset(stanford)
    rows = []
    for i, record in enumerate(ds.splits["train"]):
        x1, y1, x2, y2 = record.bbox
        if i == 0:
            x2 += 5000  # partly outside: clamped with a warning
        if i == 1:
            x1, x2 = 6000, 6100  # wholly outside: skipped
        rows.append(
            {
                "bbox_x1": x1 + 1,
                "bbox_y1": y1 + 1,
                "bbox_x2": x2,
                "bbox_y2": y2,
                "class": record.label + 1,
                "fname": record.path.name,
            }
        )
    write_annotations(annos, rows)
    paths = run_preprocess(stanford, tmp_path / "out", val_fraction=0.0)
    run = the_run()
    assert run.data.metrics["clamped_bboxes"] == 1 and run.data.metrics["skipped_images"] == 1
    assert "outside" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/skipped.txt")
    data = h5(paths["train"])[0]
    from PIL import Image

    row = [n.decode() for n in data["filenames"]].index(f"cars_train/{ds.splits['train'][0].path.name}")
    assert data["bboxes"][row][2] == Image.open(ds.splits["train"][0].path).size[0]


def test_logs_into_the_active_run(stanford, tmp_path):
    with mlflow.start_run() as outer:
        mlflow.log_param("image_size", "32.0")  # as `mlflow run` would have logged it
        run_preprocess(stanford, tmp_path / "out")
        assert mlflow.active_run().info.run_id == outer.info.run_id
    run = the_run()
    assert run.info.run_id == outer.info.run_id
    assert run.data.params["image_size"] == "32.0" and run.data.metrics["train_images"] > 0


def test_empty_data_dir_uses_the_cached_sample(tmp_path, monkeypatch):
    import carclf.data.sample_data as sample_data

    monkeypatch.setenv("CARCLF_CACHE_DIR", str(tmp_path / "cache"))
    for key, value in dict(TINY, num_classes=2, train_per_class=3, test_per_class=1).items():
        monkeypatch.setitem(sample_data.DEFAULTS, key, value)
    paths = run_preprocess("", tmp_path / "out")
    assert len(h5(paths["test"])[0]["labels"]) == 2
    assert the_run().data.params["data_source"] == "sample"
    assert len(list((tmp_path / "cache").iterdir())) == 1


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_accepts_mlflow_style_numbers(stanford, tmp_path, capsys):
    rc = prep.main(
        [
            "--data-dir",
            str(stanford),
            "--output-dir",
            str(tmp_path / "out"),
            "--image-size",
            "32.0",
            "--crop-margin",
            "8.0",
            "--workers",
            "1.0",
            "--seed",
            "0.0",
            "--val-fraction",
            "0.2",
        ]
    )
    assert rc == 0
    assert h5(tmp_path / "out" / "train.h5")[1]["image_size"] == 32
    assert "train.h5" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-dir", "/nonexistent/cars"], "error: /nonexistent/cars: no such folder"),
        (["--image-size", "22.5"], "error: argument --image-size: expected an integer, got '22.5'"),
        (["--val-fraction", "1.5"], "error: val_fraction must be in [0, 1), got 1.5"),
        (["--crop", "centre"], "error: argument --crop: invalid choice"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys, stanford, tmp_path):
    argv = ["--data-dir", str(stanford), "--output-dir", str(tmp_path / "out"), *argv]
    try:
        rc = prep.main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message) and sum(line.startswith("error:") for line in err) == 1
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_mlflow_run_entry_point(stanford, tmp_path, repo_root, mlflow_store):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        ".",
        "-e",
        "preprocess",
        "--env-manager",
        "local",
        "-P",
        f"data_dir={stanford}",
        "-P",
        f"output_dir={out}",
        "-P",
        "image_size=32",
        "-P",
        "workers=2",
        "-P",
        "val_fraction=0.2",
    ]
    # MLproject commands call `python`: the interpreter running the tests must come first on PATH.
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=mlflow_store,
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    )
    result = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"train.h5", "val.h5", "test.h5", "splits.json"}
    run = the_run()
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "preprocess"
    assert run.data.metrics["train_images"] + run.data.metrics["val_images"] == 18
    assert run.data.metrics["skipped_images"] == 0
    assert run.data.params["image_size"] == "32"


def _peak_rss_mb_of_cli(argv, env) -> tuple[int, float, str]:
    """Run ``python -m entry_points.preprocess argv``; exit code, peak RSS (MB) of it and its workers, stderr."""
    import tempfile

    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "entry_points.preprocess", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return process.returncode, usage.ru_maxrss / 1024, err.read()


def test_a_bomb_among_the_photos_costs_no_memory(stanford, tmp_path, mlflow_store):
    """One 20000x20000 PNG (1.2 GB once decoded) among the photos is skipped, read from its header
    only: the peak RSS of the whole run (workers included) stays within 100 MB of the same run without it."""
    from helpers_hostile import bomb_png

    root = make_folders(stanford, tmp_path / "flat", False)
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=mlflow_store,
        PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    common = ["--data-dir", str(root), "--image-size", "32", "--workers", "2", "--val-fraction", "0.2"]
    rc, without, err = _peak_rss_mb_of_cli([*common, "--output-dir", str(tmp_path / "a")], env)
    assert rc == 0, err[-2000:]
    (root / "Sample SUV" / "bomb.png").write_bytes(bomb_png(20000, 20000))
    rc, with_bomb, err = _peak_rss_mb_of_cli([*common, "--output-dir", str(tmp_path / "b")], env)
    assert rc == 0, err[-2000:]
    assert with_bomb - without < 100, (without, with_bomb)
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], order_by=["attributes.start_time DESC"]
    )
    assert runs[0].data.metrics["skipped_images"] == 1
    skipped = mlflow.artifacts.load_text(f"runs:/{runs[0].info.run_id}/skipped.txt")
    assert "bomb.png\timage is 400.0 megapixels, above the limit of 50.0 megapixels" in skipped


_WRITER = """
import sys, time
from carclf_flavor.images import PreprocessSettings
from carclf.data.hdf5_dataset import HDF5SplitWriter
writer = HDF5SplitWriter(sys.argv[1], ["a", "b"], PreprocessSettings(image_size=32), expected_rows=500)
print(writer.tmp_path, flush=True)
time.sleep(600)
"""


def _start_writer(target: pathlib.Path, env) -> tuple[subprocess.Popen, pathlib.Path]:
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], env=env, stdout=subprocess.PIPE, text=True)
    partial = pathlib.Path(process.stdout.readline().strip())
    assert partial.is_file() and partial.name == f".{target.name}.partial-{process.pid}"
    return process, partial


def test_next_run_removes_partials_of_killed_runs_only(stanford, tmp_path, caplog):
    """A writer killed with SIGKILL leaves its partial file; the next preprocess into the folder
    removes it and says so in one line, while a partial file whose writer is alive stays."""
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    killed, stale = _start_writer(out / "train.h5", env)
    alive, live = _start_writer(out / "val.h5", env)
    shards = out / f".train.h5.shards-{killed.pid}-0123456789ab"  # augment's shard folder of the killed run
    shards.mkdir()
    (shards / "shard-0000000000-0000000010.npz").write_bytes(b"x" * 1000)
    try:
        killed.kill()
        killed.wait()
        assert stale.exists()  # SIGKILL: nothing cleaned up
        with caplog.at_level("INFO", logger="carclf.data.preprocessing"):
            run_preprocess(stanford, out)
        assert not stale.exists() and not shards.exists()
        assert live.exists()  # its writer still runs
        assert {p.name for p in out.iterdir()} == {"train.h5", "val.h5", "test.h5", "splits.json", live.name}
        lines = [r.getMessage() for r in caplog.records if "partial file" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0]
        assert f"removed 2 partial file(s) left in {out} by runs that were killed" in lines[0]
        assert stale.name in lines[0] and shards.name in lines[0] and live.name not in lines[0]
    finally:
        alive.kill()
        alive.wait()
        killed.kill()


def test_crop_none_ignores_the_boxes(stanford, tmp_path):
    """The flavor's bbox policy: with crop=none a box is not looked at (a nonsense box keeps its photo, nothing is
    clamped) and the whole photo is recorded as the box used; the pixels are the served model's for no box."""
    from PIL import Image

    from carclf_flavor.images import PreprocessSettings, prepare_photo

    annos = stanford / "devkit" / "cars_train_annos.mat"
    ds = read_dataset(stanford)
    rows = []
    for i, record in enumerate(ds.splits["train"]):
        x1, y1, x2, y2 = record.bbox
        if i == 0:
            x1, x2 = 6000, 6100  # wholly outside
        if i == 1:
            x1, x2 = x2, x1  # inverted
        box = {"bbox_x1": x1 + 1, "bbox_y1": y1 + 1, "bbox_x2": x2, "bbox_y2": y2}
        rows.append({**box, "class": record.label + 1, "fname": record.path.name})
    write_annotations(annos, rows)
    paths = run_preprocess(stanford, tmp_path / "out", val_fraction=0.0, crop="none")
    run = the_run()
    assert run.data.metrics["clamped_bboxes"] == 0 and run.data.metrics["skipped_images"] == 0
    data = h5(paths["train"])[0]
    names = [n.decode() for n in data["filenames"]]
    settings = PreprocessSettings(image_size=SIZE, crop="none")
    for record in ds.splits["train"][:2]:
        row = names.index(f"cars_train/{record.path.name}")
        assert tuple(data["bboxes"][row]) == (0, 0, *Image.open(record.path).size)
        assert np.array_equal(data["images"][row], prepare_photo(record.path.read_bytes(), (1, 2, 0, 0), settings))
