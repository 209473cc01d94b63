"""`tune`: try many `train` configurations at once, each trial a Spark task and an MLflow child run.

``mlflow run . -e tune -P train_data=... -P val_data=... [-P test_data=...] -P trials=16 -P parallel=4
[-P space=tune.yaml] [-P spark_master=local[*]] [-P study_name=...] [-P registered_model_name=carclf]``

The search space (``entry_points/search_space.py``: the default, or a YAML file) is checked against `train`'s
own validation before anything starts. The study (``entry_points/spark_study.py``) runs on the active Spark
session (Databricks, notebooks) or one on ``spark_master``; the tune run is the study's parent run, the best
trial's model is registered as ``registered_model_name`` with the alias ``champion``, and its validation and
test metrics and the study's plots (``plots/*.png``) are logged on the tune run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from entry_points.cli_args import parse_int
from entry_points.search_space import SearchSpaceError, check_space, load_space
from entry_points.spark_study import CHAMPION_ALIAS, PRUNERS, TuneError, run_study

log = logging.getLogger("carclf.tune")


def tune(
    train_data: str,
    val_data: str,
    test_data: str = "",
    trials: int = 16,
    parallel: int = 4,
    space: str = "",
    spark_master: str = "local[*]",
    study_name: str = "",
    registered_model_name: str = "carclf",
    pruner: str = "median",
) -> dict:
    """Check the space and inputs, then run (or resume) the study; returns the summary of ``run_study``."""
    if int(trials) < 1:
        raise TuneError(f"trials must be >= 1, got {trials}")
    if int(parallel) < 1:
        raise TuneError(f"parallel must be >= 1, got {parallel}")
    if pruner not in PRUNERS:
        raise TuneError(f"pruner must be one of {PRUNERS}, got {pruner!r}")
    dimensions = load_space(space)
    check_space(dimensions, train_data, val_data, source=f"space file {space}" if space else "default space")
    if test_data:
        from entry_points.hdf5_dataset import check_compatible
        from entry_points.input_pipeline import HDF5Source

        check_compatible(HDF5Source.open(train_data).infos + HDF5Source.open(test_data).infos)
    return run_study(dimensions, train_data, val_data, test_data, trials=int(trials), parallel=int(parallel),
                     spark_master=spark_master, study_name=study_name,
                     registered_model_name=registered_model_name, pruner=pruner, alias=CHAMPION_ALIAS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m entry_points.tune", description=__doc__.splitlines()[0])
    p.add_argument("--train-data", required=True, help="HDF5 file(s), comma-separated")
    p.add_argument("--val-data", required=True)
    p.add_argument("--test-data", default="")
    p.add_argument("--trials", type=parse_int, default=16, help="finished trials the study should hold")
    p.add_argument("--parallel", type=parse_int, default=4, help="trials running at once (Spark tasks)")
    p.add_argument("--space", default="", help="YAML search space; empty = the default space")
    p.add_argument("--spark-master", default="local[*]")
    p.add_argument("--study-name", default="", help="same name again = resume; empty = a new study")
    p.add_argument("--registered-model-name", default="carclf", help="empty: do not register")
    p.add_argument("--pruner", default="median", choices=PRUNERS)
    return p


def _record_failure(message: str) -> None:
    """Under `mlflow run` the run exists already: say on it why the step stopped."""
    import mlflow

    run_id = os.environ.get("MLFLOW_RUN_ID") or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    if run_id:
        mlflow.tracking.MlflowClient().set_tag(run_id, "carclf.error", message[:4000])
    if mlflow.active_run() is not None:
        mlflow.end_run("FAILED")


def main(argv=None) -> int:
    from carclf_flavor.resnet import WeightsError
    from entry_points.hdf5_dataset import DatasetError
    from entry_points.spark_session import SparkSetupError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        result = tune(**vars(args))
    except (SearchSpaceError, TuneError, DatasetError, SparkSetupError, WeightsError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _record_failure(message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    counts = result["counts"]
    print(f"\nstudy {result['study_name']} (run {result['study_run_id']}): {counts['complete']} complete, "
          f"{counts['pruned']} pruned, {counts['fail']} failed")
    print(f"best: trial {result['best_trial']} val top-1 {result['best_value']:.4f} {result['best_params']}")
    for name, value in sorted(result["test_metrics"].items()):
        print(f"  {name:<16} {value:.4f}")
    print(f"model: {result['model_uri']}"
          + (f" (alias {CHAMPION_ALIAS})" if result["registered_version"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
