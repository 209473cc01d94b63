"""`tune`: 4 trials at parallel=2 vs the same 4 trials at parallel=1, on local[2]; target speed-up >= 1.5x.

The trials are identical (a space of fixed values: ResNet-18 width 0.25 at 48 px, 2 epochs, Adam), so the
two runs do the same work; only how many trials share the cores differs, and with it the TensorFlow thread
count per trial (printed). Each configuration runs in its own process with a fresh Spark session and SQLite
store (TensorFlow's thread pools are fixed per process, and Spark reuses its Python workers). The time is the
study's own (``tune_seconds``: from the first Spark task to the last trial), plus the whole call beside it
(Spark session, plots, and logging the best trial's model once: trials log no model, see
``carclf/tuning/champion.py``). Beside them, from the runs' timestamps: the start-up before the first trial
(Spark job, Python workers and their imports: the same at any ``parallel``, the serial part of the study) and
the trials alone.
The host's load average is printed before and after: on cores shared with other work the kernel shares CPU
time per thread, so 2 trials of 1 thread get no more than 1 trial of 2 threads, and the speed-up cannot show.

Sizes (environment variables): CARCLF_BENCH_TUNE_TRIALS (4), CARCLF_BENCH_TUNE_SIZE (48 px),
CARCLF_BENCH_TUNE_IMAGES (96 training images), CARCLF_BENCH_TUNE_EPOCHS (2).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

TRIALS = int(os.environ.get("CARCLF_BENCH_TUNE_TRIALS", 4))
SIZE = int(os.environ.get("CARCLF_BENCH_TUNE_SIZE", 48))
IMAGES = int(os.environ.get("CARCLF_BENCH_TUNE_IMAGES", 96))
EPOCHS = int(os.environ.get("CARCLF_BENCH_TUNE_EPOCHS", 2))
CLASSES = ["red", "green", "blue", "white"]


def write_split(path: pathlib.Path, count: int, seed: int) -> str:
    from carclf.data.hdf5_dataset import write_hdf5_split
    from carclf_flavor.images import PreprocessSettings

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), count)
    images = rng.integers(0, 80, (count, SIZE, SIZE, 3)).astype(np.uint8)
    for c in range(3):
        images[labels == c, :, :, c] += 150
    images[labels == 3] += 150
    return str(write_hdf5_split(path, images, labels, CLASSES, PreprocessSettings(image_size=SIZE)))


def trial_phases(study, trials) -> dict:
    """Where the study's time went, from the runs' own timestamps: the start-up before the first trial (Spark
    job, Python workers, their imports: the same at any ``parallel``), and the trials from the first one's start
    to the last one's value (a trial run's end is not used: the best one is reopened to log the champion)."""
    import mlflow

    client = mlflow.MlflowClient()
    (tune_seconds,) = client.get_metric_history(study.info.run_id, "tune_seconds")
    began = tune_seconds.timestamp / 1000 - tune_seconds.value
    first = min(r.info.start_time for r in trials) / 1000
    durations, last = [], first
    for run in trials:
        (value,) = client.get_metric_history(run.info.run_id, "value")
        durations.append(value.timestamp / 1000 - run.info.start_time / 1000)
        last = max(last, value.timestamp / 1000)
    return {"startup_seconds": first - began, "trials_seconds": last - first, "per_trial": durations}


def child(workdir: str, parallel: int) -> dict:
    """One study in this process: its own store, fixed trials, `parallel` at once on local[2]."""
    import mlflow

    from carclf.compute.spark_session import get_spark
    from carclf.tuning.search_space import load_space
    from carclf.tuning.spark_study import run_study, thread_budget, trials_per_host

    root = pathlib.Path(workdir)
    mlflow.set_tracking_uri(f"sqlite:///{root / f'p{parallel}.db'}")
    experiment_id = mlflow.MlflowClient().create_experiment(
        f"bench-p{parallel}", artifact_location=str(root / f"artifacts-p{parallel}")
    )
    mlflow.set_experiment(experiment_id=experiment_id)
    space = root / "space.yaml"
    started = time.perf_counter()
    result = run_study(
        load_space(space),
        str(root / "train.h5"),
        str(root / "val.h5"),
        trials=TRIALS,
        parallel=parallel,
        spark_master="local[2]",
        registered_model_name="",
        pruner="none",
    )
    total = time.perf_counter() - started
    study = mlflow.MlflowClient().get_run(result["study_run_id"])
    trials = mlflow.MlflowClient().search_runs(
        [study.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{study.info.run_id}'"
    )
    trial_threads = sorted({r.data.params.get("tf_intra_op_threads") for r in trials})
    intra, inter = thread_budget(trials_per_host(get_spark("local[2]"), parallel))
    return {
        **trial_phases(study, trials),
        "study_seconds": study.data.metrics["tune_seconds"],
        "total_seconds": total,
        "complete": result["counts"]["complete"],
        "intra": intra,
        "inter": inter,
        "logged_intra": trial_threads,
    }


def main() -> int:
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="carclf-bench-tune-") as tmp:
        root = pathlib.Path(tmp)
        write_split(root / "train.h5", IMAGES, 0)
        write_split(root / "val.h5", max(16, IMAGES // 4), 1)
        (root / "space.yaml").write_text(
            f"depth: 18\nwidth: 0.25\nepochs: {EPOCHS}\nhead_epochs: 0\nbatch_size: 16\noptimizer: adam\n"
            "learning_rate: 0.003\nonline_augment: false\n"
        )
        print("load average (1/5/15 min) before: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
        print(
            f"{TRIALS} identical trials (ResNet-18 width 0.25, {SIZE} px, {IMAGES} images, {EPOCHS} epochs) "
            f"on local[2], {os.cpu_count()} cores on this host"
        )
        results = {}
        for parallel in (1, 2):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_tune", "--child", tmp, str(parallel)],
                capture_output=True,
                text=True,
                cwd=pathlib.Path(__file__).parents[1],
                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
            )
            if out.returncode != 0:
                print(out.stdout[-2000:] + out.stderr[-4000:], file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[parallel] = r
            print(
                f"   parallel={parallel}: study {r['study_seconds']:6.1f} s (whole call {r['total_seconds']:6.1f} s), "
                f"{r['complete']} complete; TensorFlow threads per trial: {r['intra']} intra-op, {r['inter']} "
                f"inter-op (logged on the trials: {', '.join(map(str, r['logged_intra']))})"
            )
            print(
                f"      start-up before the first trial {r['startup_seconds']:5.1f} s, trials {r['trials_seconds']:5.1f} s "
                f"(each, start to value: {', '.join(f'{d:.1f}' for d in sorted(r['per_trial']))} s)"
            )
        speedup = results[1]["study_seconds"] / results[2]["study_seconds"]
        whole = results[1]["total_seconds"] / results[2]["total_seconds"]
        trials_only = results[1]["trials_seconds"] / results[2]["trials_seconds"]
        print(
            f"   speed-up parallel=2 vs parallel=1: {speedup:.2f}x study, {whole:.2f}x whole call "
            f"(target >= 1.5x) {'OK' if speedup >= 1.5 else 'BELOW TARGET'}; trials alone {trials_only:.2f}x"
        )
        print("   load average (1/5/15 min) after: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
