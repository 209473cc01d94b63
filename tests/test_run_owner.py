"""A step's run whose process died is set KILLED by the next run of the same step; live owners are left alone."""

import os
import signal
import socket
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from carclf.data.sample_data import generate_sample_dataset
from carclf.tracking import run_owner
from entry_points.preprocess import preprocess

# A step process that claims its run and then waits: killed while its run is RUNNING, or left alive.
_HOLDER = """
import sys
from carclf.tracking.runs import step_run
with step_run(sys.argv[1]) as run:
    print(run.info.run_id, flush=True)
    sys.stdin.read()
"""


def _start_holder(step: str, repo_root) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, step], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    run_id = process.stdout.readline().strip()
    assert run_id, "the holder process ended before it started its run"
    return process, run_id


def _status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def test_next_run_of_the_step_kills_the_dead_ones_only(tmp_path, repo_root, caplog):
    data = generate_sample_dataset(
        tmp_path / "src", seed=3, num_classes=2, train_per_class=3, test_per_class=1, min_width=64, max_width=80
    )
    dead, dead_id = _start_holder("preprocess", repo_root)
    alive, alive_id = _start_holder("preprocess", repo_root)
    other_dead, other_dead_id = _start_holder("augment", repo_root)
    try:
        for process in (dead, other_dead):
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        assert _status(dead_id) == "RUNNING"  # nothing ended it: its process could not

        with caplog.at_level("WARNING", logger=run_owner.__name__):
            preprocess(data_dir=data, output_dir=tmp_path / "out", image_size=32, workers=1)

        assert _status(dead_id) == "KILLED"
        assert _status(alive_id) == "RUNNING"  # its process still runs
        assert _status(other_dead_id) == "RUNNING"  # another step's run: that step's next run ends it
        runs = MlflowClient().search_runs(["0"], filter_string="attributes.status = 'FINISHED'")
        assert len(runs) == 1 and runs[0].data.tags[run_owner.TAG_STEP] == "preprocess"
        assert runs[0].data.tags[run_owner.TAG_OWNER_PID] == str(os.getpid())
        lines = [r.getMessage() for r in caplog.records if "marked KILLED" in r.getMessage()]
        assert len(lines) == 1 and dead_id in lines[0], lines
    finally:
        alive.stdin.close()
        alive.wait(timeout=60)
    assert _status(alive_id) == "FINISHED"


@pytest.mark.parametrize(
    "tags, gone",
    [
        ({}, False),  # not a run this module tagged
        ({"host": "elsewhere", "pid": "self", "started": "self"}, False),  # cannot be checked from here
        ({"pid": "self", "started": "self"}, False),
        ({"pid": "self", "started": ""}, False),  # no start time recorded: the pid alone decides
        ({"pid": "self", "started": "other-boot:1"}, True),  # the pid now belongs to another process
        ({"pid": "dead", "started": ""}, True),
        ({"pid": "not-a-pid", "started": ""}, False),
    ],
)
def test_owner_is_gone(tags, gone):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pids = {"self": str(os.getpid()), "dead": finished.stdout.strip(), "not-a-pid": "x"}
    host = socket.gethostname()
    recorded = {}
    if tags:
        recorded[run_owner.TAG_OWNER_HOST] = tags.get("host", host)
        recorded[run_owner.TAG_OWNER_PID] = pids[tags["pid"]]
        started = tags["started"]
        recorded[run_owner.TAG_OWNER_STARTED] = run_owner.process_start(os.getpid()) if started == "self" else started
    assert run_owner.owner_is_gone(recorded, host) is gone
