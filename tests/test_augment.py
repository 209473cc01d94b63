"""`augment` on a real local Spark session (one per module: the JVM start is the slow part), 32 px images."""

import dataclasses
import pathlib
import shutil

import h5py
import numpy as np
import pytest

from carclf.augmentation.errors import AugmentError
from carclf.augmentation.in_process import augment_in_process
from carclf.augmentation.job import JobSpec, read_input_meta
from carclf.augmentation.range_task import FAIL_ENV, run_range
from carclf.augmentation.shards import merge_metadata, shard_path
from carclf.augmentation.spark_job import plan_ranges
from carclf.augmentation.transforms import OPS, AugmentParams, augment_image, rng_for
from carclf.compute.ports import free_port
from carclf.compute.spark_session import SparkSetupError, check_java, get_spark, session_master
from carclf.data.hdf5_dataset import read_dataset_info, write_hdf5_split
from carclf_flavor.images import PreprocessSettings
from entry_points import augment as aug

# Two cores, and up to 4 attempts per task: local[N] alone never retries a failed task.
MASTER = "local[2,4]"
SIZE = 32
NUM_IMAGES = 18
CLASS_NAMES = ["Audi A4 Sedan 2012", "BMW M3 Coupe 2012", "Ford F-150 2007"]
ALL_OPS = ",".join(OPS)


def _asymmetric_images(n: int, size: int, seed: int) -> np.ndarray:
    """Noise plus a bright bar near the LEFT edge and a dark corner at the top: no image equals its mirror."""
    rng = np.random.default_rng(seed)
    images = rng.integers(40, 200, (n, size, size, 3), dtype=np.uint8)
    images[:, :, 2:6, :] = 255
    images[:, :4, -8:, :] = 0
    return images


@pytest.fixture(scope="module")
def spark():
    session = get_spark(MASTER, app_name="carclf-test-augment")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("augment_src")
    rng = np.random.default_rng(7)
    labels = rng.integers(0, len(CLASS_NAMES), NUM_IMAGES)
    path = write_hdf5_split(
        folder / "train.h5",
        _asymmetric_images(NUM_IMAGES, SIZE, 1),
        labels,
        CLASS_NAMES,
        PreprocessSettings(image_size=SIZE, crop="bbox", crop_margin=8),
        split="train",
        filenames=[f"{i:05d}.jpg" for i in range(NUM_IMAGES)],
        bboxes=np.column_stack(
            [np.arange(NUM_IMAGES), np.zeros(NUM_IMAGES), np.full(NUM_IMAGES, 90), np.full(NUM_IMAGES, 60)]
        ),
    )
    return path


def _read(path):
    with h5py.File(path, "r") as f:
        return {
            name: f[name][()]
            for name in ("images", "labels", "source_index", "bboxes", "filenames", "class_names")
            if name in f
        } | {"attrs": dict(f.attrs)}


def _hidden_leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_labels_class_names_and_copies_preserved(spark, source, tmp_path):
    import mlflow

    out = tmp_path / "out" / "train_aug.h5"
    summary = aug.augment(input=source, output=out, copies=3, spark_master=MASTER, partitions=2, seed=5)
    src, got = _read(source), _read(out)
    assert summary["num_output_images"] == NUM_IMAGES * 4 == len(got["images"])
    assert [c.decode() for c in got["class_names"]] == CLASS_NAMES
    originals = got["source_index"] == -1
    assert originals.sum() == NUM_IMAGES
    np.testing.assert_array_equal(got["images"][originals], src["images"])
    counts = np.bincount(got["source_index"][~originals], minlength=NUM_IMAGES)
    assert counts.tolist() == [3] * NUM_IMAGES
    # Every row keeps the label, file name and bbox of its source image.
    source_of_row = np.repeat(np.arange(NUM_IMAGES), 4)
    np.testing.assert_array_equal(got["labels"], src["labels"][source_of_row])
    np.testing.assert_array_equal(got["bboxes"], src["bboxes"][source_of_row])
    assert list(got["filenames"]) == list(src["filenames"][source_of_row])
    augmented = got["images"][~originals]
    assert not np.array_equal(augmented, src["images"][got["source_index"][~originals]])
    for key in ("image_size", "crop", "crop_margin", "resize_mode", "split"):
        assert got["attrs"][key] == src["attrs"][key]
    assert got["attrs"]["augment_copies"] == 3
    assert _hidden_leftovers(out.parent) == []

    info = read_dataset_info(out)
    assert info.num_images == NUM_IMAGES * 4 and info.has_source_index and info.class_names == tuple(CLASS_NAMES)

    run = mlflow.last_active_run()
    assert run.data.params["copies"] == "3" and run.data.params["ops"] == "crop,pad,flip"
    assert run.data.metrics["num_output_images"] == NUM_IMAGES * 4
    assert run.data.metrics["images_per_second"] > 0
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert "augment_samples.png" in artifacts


def test_train_input_pipeline_reads_the_output(spark, source, tmp_path):
    from carclf.data.input_pipeline import HDF5Source

    out = tmp_path / "train_aug.h5"
    aug.augment(input=source, output=out, copies=1, spark_master=MASTER, partitions=2, log_to_mlflow=False)
    # train opens its files through HDF5Source (validation + compatibility with the other splits).
    train = HDF5Source.open(f"{out},{source}")
    assert train.num_images == NUM_IMAGES * 2 + NUM_IMAGES and train.class_names == tuple(CLASS_NAMES)
    images, labels = train.read_rows([0, 1, 2 * NUM_IMAGES - 1])
    assert images.shape == (3, SIZE, SIZE, 3) and labels.dtype == np.int32


def test_flip_really_mirrors(spark, source, tmp_path):
    out = tmp_path / "flipped.h5"
    aug.augment(
        input=source,
        output=out,
        copies=1,
        keep_original=False,
        ops="flip",
        flip_prob=1.0,
        spark_master=MASTER,
        partitions=3,
        log_to_mlflow=False,
    )
    src, got = _read(source), _read(out)
    np.testing.assert_array_equal(got["source_index"], np.arange(NUM_IMAGES))
    np.testing.assert_array_equal(got["images"], src["images"][:, :, ::-1, :])
    # The bright bar moved from the left edge to the right edge.
    assert (got["images"][:, :, -6:-2, :] == 255).all() and not (got["images"][:, :, 2:6, :] == 255).all()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("size", [32, 33])
def test_every_op_keeps_size_and_changes_pixels(op, size):
    image = _asymmetric_images(1, size, 3)[0]
    params = AugmentParams.parse(op, flip_prob=1.0)
    changed = 0
    for copy in range(1, 6):
        out = augment_image(image, params, rng_for(0, 0, copy))
        assert out.shape == image.shape and out.dtype == np.uint8 and out.flags.c_contiguous
        changed += not np.array_equal(out, image)
        # Same key, same result: the randomness depends on (seed, row, copy) only.
        np.testing.assert_array_equal(out, augment_image(image, params, rng_for(0, 0, copy)))
    assert changed >= 3, f"{op} left the image unchanged in {5 - changed} of 5 draws"


def test_same_output_with_1_and_3_partitions_and_in_process(spark, source, tmp_path):
    one, three = tmp_path / "p1.h5", tmp_path / "p3.h5"
    common = dict(copies=2, ops=ALL_OPS, seed=11, spark_master=MASTER, log_to_mlflow=False)
    assert aug.augment(input=source, output=one, partitions=1, **common)["partitions"] == 1
    assert aug.augment(input=source, output=three, partitions=3, **common)["partitions"] == 3
    reference = augment_in_process(source, tmp_path / "loop.h5", copies=2, keep_original=True, ops=ALL_OPS, seed=11)
    a, b, c = _read(one), _read(three), _read(reference["output"])
    for key in ("images", "labels", "source_index", "bboxes"):
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])
    other = augment_in_process(source, tmp_path / "seed12.h5", copies=2, keep_original=True, ops=ALL_OPS, seed=12)
    assert not np.array_equal(_read(other["output"])["images"], a["images"])


def test_task_killed_once_is_retried_without_duplicates(spark, source, tmp_path, monkeypatch):
    if "," not in session_master(spark):
        pytest.skip(f"the active Spark session ({session_master(spark)}) does not retry failed tasks")
    markers = tmp_path / "markers"
    monkeypatch.setenv(FAIL_ENV, f"once:{markers}")
    out = tmp_path / "out" / "retried.h5"
    aug.augment(input=source, output=out, copies=2, spark_master=MASTER, partitions=3, seed=3, log_to_mlflow=False)
    # Every task's first attempt died halfway through its rows (worker killed: half its images written, no shard).
    assert len(list(markers.iterdir())) == 3
    got = _read(out)
    counts = np.bincount(got["source_index"][got["source_index"] >= 0], minlength=NUM_IMAGES)
    assert len(got["images"]) == NUM_IMAGES * 3 and counts.tolist() == [2] * NUM_IMAGES
    monkeypatch.delenv(FAIL_ENV)
    reference = augment_in_process(source, tmp_path / "loop.h5", copies=2, keep_original=True, seed=3)
    np.testing.assert_array_equal(got["images"], _read(reference["output"])["images"])
    assert _hidden_leftovers(out.parent) == []


def test_tasks_write_their_rows_into_the_preallocated_output_in_any_order(source, tmp_path):
    """The mechanism under the Spark job, without Spark: ranges written last-first, straight into the block."""
    from carclf.data.hdf5_dataset import HDF5SplitWriter

    info, split = read_input_meta(str(source))
    spec = JobSpec(
        input=str(source),
        copies=2,
        keep_original=True,
        params=AugmentParams.parse("crop,flip"),
        seed=5,
        shard_dir=str(tmp_path / "shards"),
    )
    (tmp_path / "shards").mkdir()
    ranges = plan_ranges(NUM_IMAGES, 3)
    out = tmp_path / "direct.h5"
    with HDF5SplitWriter(
        out,
        info.class_names,
        info.settings,
        split=split,
        with_source_index=True,
        expected_rows=NUM_IMAGES * 3,
        preallocate_images=True,
    ) as writer:
        spec = dataclasses.replace(
            spec, output_tmp=str(writer.tmp_path), images_offset=writer.images_offset, row_bytes=writer.row_bytes
        )
        results = [run_range(spec, a, b) for a, b in reversed(ranges)]
        assert merge_metadata(results, ranges, spec, writer) == NUM_IMAGES * 3
    reference = augment_in_process(source, tmp_path / "loop.h5", copies=2, keep_original=True, ops="crop,flip", seed=5)
    got, want = _read(out), _read(reference["output"])
    for key in ("images", "labels", "bboxes", "source_index", "filenames"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with h5py.File(out, "r") as f:
        assert f["images"].chunks is None  # one contiguous block: the pixels were written once, in place
        assert f.attrs["num_images"] == NUM_IMAGES * 3
    # A range without its shard (its task never finished) fails the merge, and the output is not created.
    shard_path(spec.shard_dir, *ranges[1]).unlink()
    out2 = tmp_path / "incomplete.h5"
    with pytest.raises(AugmentError, match=r"shard-.*\.npz: missing or unreadable metadata shard"):
        with HDF5SplitWriter(
            out2,
            info.class_names,
            info.settings,
            split=split,
            with_source_index=True,
            expected_rows=NUM_IMAGES * 3,
            preallocate_images=True,
        ) as writer:
            merge_metadata(results, ranges, spec, writer)
    assert list(tmp_path.glob("incomplete*")) == [] and _hidden_leftovers(tmp_path) == []


def test_failed_job_leaves_no_output_and_no_shards(spark, source, tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "always")
    out = tmp_path / "out" / "never.h5"
    with pytest.raises(AugmentError, match="Spark job on .* failed: .*injected failure"):
        aug.augment(input=source, output=out, copies=1, spark_master=MASTER, partitions=1, log_to_mlflow=False)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda src, tmp: ["--input", str(tmp / "nope.h5")], "nope.h5: no such file"),
        (lambda src, tmp: ["--input", str(_text_file(tmp))], "not a readable HDF5 file"),
        (lambda src, tmp: ["--input", str(src), "--ops", "crop,twirl"], "unknown op(s) 'twirl'"),
        (lambda src, tmp: ["--input", str(src), "--copies", "-1"], "copies must be >= 0"),
        (lambda src, tmp: ["--input", str(src), "--crop-scale", "1.5"], "crop_scale must be between"),
        (
            lambda src, tmp: ["--input", str(src), "--spark-master", f"spark://127.0.0.1:{free_port()}"],
            "cannot reach Spark master spark://127.0.0.1:",
        ),
    ],
)
def test_bad_inputs_give_one_clear_line(source, tmp_path, capsys, make_args, expected):
    out = tmp_path / "out.h5"
    rc = aug.main(make_args(source, tmp_path) + ["--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()


def _text_file(folder):
    path = folder / "notes.h5"
    path.write_text("not hdf5")
    return path


def test_cli_accepts_mlflow_style_numbers(spark, source, tmp_path, capsys):
    out = tmp_path / "cli.h5"
    rc = aug.main(
        [
            "--input",
            str(source),
            "--output",
            str(out),
            "--copies",
            "1.0",
            "--partitions",
            "2.0",
            "--keep-original",
            "false",
            "--ops",
            "rotate,brightness",
            "--spark-master",
            MASTER,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert read_dataset_info(out).num_images == NUM_IMAGES


def test_java_missing_says_how_to_install(tmp_path):
    with pytest.raises(SparkSetupError, match="apt-get install -y default-jre-headless"):
        check_java({"PATH": str(tmp_path)})
    with pytest.raises(SparkSetupError, match=f"JAVA_HOME={tmp_path} has no bin/java"):
        check_java({"JAVA_HOME": str(tmp_path), "PATH": "/usr/bin"})


def test_plan_ranges_cover_every_row_once():
    for n, parts in [(1, 4), (10, 3), (1000, 7), (5, 5)]:
        ranges = plan_ranges(n, parts)
        rows = [r for a, b in ranges for r in range(a, b)]
        assert rows == list(range(n)) and len(ranges) == min(n, parts)


def test_cluster_executors_get_the_packages_the_tasks_run_from(tmp_path):
    """On a cluster the executors have no checkout: the archive shipped to them holds the task code."""
    import zipfile

    from carclf.compute.spark_session import ship_project_code

    class Context:
        def addPyFile(self, path):  # noqa: N802 - SparkContext's name
            self.path = path

    class Session:
        sparkContext = Context()  # noqa: N815

    session = Session()
    ship_project_code(session)
    archive = pathlib.Path(session.sparkContext.path)
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    shutil.rmtree(archive.parent)
    for module in ("carclf/augmentation/range_task.py", "carclf/data/hdf5_dataset.py", "carclf_flavor/images.py"):
        assert module in names
