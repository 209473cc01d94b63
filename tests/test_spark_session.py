"""Spark start failures through the real augment CLI: one line naming the master and Java's reason; Java's
stack trace only in the log file the line names."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from carclf.data.hdf5_dataset import write_hdf5_split
from carclf_flavor.images import PreprocessSettings


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spark_src")
    return write_hdf5_split(
        folder / "train.h5",
        np.zeros((4, 16, 16, 3), np.uint8),
        np.array([0, 1, 0, 1]),
        ["a", "b"],
        PreprocessSettings(image_size=16),
        split="train",
        filenames=[f"{i}.jpg" for i in range(4)],
        bboxes=np.zeros((4, 4)),
    )


def _augment_cli(tiny_split, tmp_path, master):
    env = dict(
        os.environ,
        CARCLF_SPARK_LOG_DIR=str(tmp_path / "logs"),
        PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "entry_points.augment",
            "--input",
            str(tiny_split),
            "--output",
            str(tmp_path / "out.h5"),
            "--spark-master",
            master,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _no_java_noise(stderr: str):
    lines = stderr.strip().splitlines()
    assert not any(
        line.lstrip().startswith("at ") or "Exception in thread" in line or "Traceback" in line for line in lines
    ), stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def test_unknown_master_scheme_is_one_line_without_a_jvm(tiny_split, tmp_path):
    result = _augment_cli(tiny_split, tmp_path, "bogus://x")
    assert result.returncode != 0
    line = _no_java_noise(result.stderr)
    assert line.startswith("error: Spark master URL 'bogus://x' is not one Spark accepts (expected local[N]")
    assert not (tmp_path / "out.h5").exists()


def test_jvm_refusal_is_one_line_with_the_stack_trace_in_the_log(tiny_split, tmp_path):
    result = _augment_cli(tiny_split, tmp_path, "local[abc]")
    assert result.returncode != 0
    line = _no_java_noise(result.stderr)
    found = re.fullmatch(
        r"error: could not start Spark on local\[abc\]: Could not parse Master URL: "
        r"'local\[abc\]' \(Java's output: (.+\.log)\)",
        line,
    )
    assert found, line
    log = pathlib.Path(found.group(1))
    assert log.parent == tmp_path / "logs"
    assert "\tat org.apache.spark.SparkContext" in log.read_text()
    assert not (tmp_path / "out.h5").exists()
