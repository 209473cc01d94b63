"""`tune`: try many `train` configurations at once, each trial a Spark task and an MLflow child run.

``mlflow run . -e tune -P train_data=... -P val_data=... [-P test_data=...] -P trials=16 -P parallel=4
[-P space=tune.yaml] [-P spark_master=local[*]] [-P study_name=...] [-P registered_model_name=carclf]``

The search space (``carclf/tuning/search_space.py``: the default, or a YAML file) is checked against `train`'s
own validation before anything starts. The study (``carclf/tuning/spark_study.py``) runs on the active Spark
session (Databricks, notebooks) or one on ``spark_master``; the tune run is the study's parent run, the best
trial's model is registered as ``registered_model_name`` with the alias ``champion``, and its validation and
test metrics and the study's plots (``plots/*.png``) are logged on the tune run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import config_from_args, param, resolve_config
from carclf.tuning.search_space import SearchSpaceError, check_space, load_space
from carclf.tuning.spark_study import CHAMPION_ALIAS, PRUNERS, TuneError, run_study

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """The `tune` step's parameters (carclf.cli.step_config: each default written once, here)."""

    train_data: str = param(help="HDF5 file(s), comma-separated")
    val_data: str = param(help="HDF5 file(s), comma-separated")
    test_data: str = param("", "HDF5 file(s) the best trial's model is scored on; empty: none")
    trials: int = param(16, "finished trials the study should hold")
    parallel: int = param(4, "trials running at once (Spark tasks)")
    space: str = param("", "YAML search space; empty = the default space")
    spark_master: str = param("local[*]", "Spark master that runs the trials (the active session wins)")
    study_name: str = param("", "same name again = resume; empty = a new study")
    registered_model_name: str = param("carclf", "empty: do not register")
    pruner: str = param("median", "stops poor trials early", choices=PRUNERS)


def tune(config: TuneConfig | None = None, **overrides) -> dict:
    """Check the space and inputs, then run (or resume) the study; returns the summary of ``run_study``."""
    c = resolve_config(TuneConfig, config, **overrides)
    train_data, val_data, test_data, trials, parallel = c.train_data, c.val_data, c.test_data, c.trials, c.parallel
    space, spark_master, study_name, pruner = c.space, c.spark_master, c.study_name, c.pruner
    registered_model_name = c.registered_model_name
    if int(trials) < 1:
        raise TuneError(f"trials must be >= 1, got {trials}")
    if int(parallel) < 1:
        raise TuneError(f"parallel must be >= 1, got {parallel}")
    if pruner not in PRUNERS:
        raise TuneError(f"pruner must be one of {PRUNERS}, got {pruner!r}")
    dimensions = load_space(space)
    check_space(dimensions, train_data, val_data, source=f"space file {space}" if space else "default space")
    if test_data:
        from carclf.data.hdf5_dataset import check_compatible
        from carclf.data.input_pipeline import HDF5Source

        check_compatible(HDF5Source.open(train_data).infos + HDF5Source.open(test_data).infos)
    return run_study(
        dimensions,
        train_data,
        val_data,
        test_data,
        trials=int(trials),
        parallel=int(parallel),
        spark_master=spark_master,
        study_name=study_name,
        registered_model_name=registered_model_name,
        pruner=pruner,
        alias=CHAMPION_ALIAS,
    )


def build_parser():
    return build_parser_for(TuneConfig, "python -m entry_points.tune", __doc__.splitlines()[0])


def _record_failure(message: str) -> None:
    """Under `mlflow run` the run exists already: say on it why the step stopped."""
    import mlflow

    run_id = os.environ.get("MLFLOW_RUN_ID") or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    if run_id:
        mlflow.tracking.MlflowClient().set_tag(run_id, "carclf.error", message[:4000])
    if mlflow.active_run() is not None:
        mlflow.end_run("FAILED")


def main(argv=None) -> int:
    from carclf.compute.spark_session import SparkSetupError
    from carclf.data.hdf5_dataset import DatasetError
    from carclf_flavor.pretrained import WeightsError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        result = tune(config_from_args(TuneConfig, args))
    except (SearchSpaceError, TuneError, DatasetError, SparkSetupError, WeightsError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _record_failure(message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    counts = result["counts"]
    print(
        f"\nstudy {result['study_name']} (run {result['study_run_id']}): {counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['fail']} failed"
    )
    print(f"best: trial {result['best_trial']} val top-1 {result['best_value']:.4f} {result['best_params']}")
    for name, value in sorted(result["test_metrics"].items()):
        print(f"  {name:<16} {value:.4f}")
    print(f"model: {result['model_uri']}" + (f" (alias {CHAMPION_ALIAS})" if result["registered_version"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
