"""The study's result: the best trial's model logged once (through the flavor, with its int8 network, exactly
as `train` logs a model), registered with an alias and scored on the test set; the study's plots; the summary.

Trials do not log a model: converting, quantizing and validating the int8 network takes longer than training
one of the small trials a study runs (ResNet-18 width 0.25 at 48 px: 8.8 s of a 13.5 s trial), and only one
model is wanted. Each trial that finishes keeps its final weights and the `train` arguments it ran with
(``tune/model.weights.h5``, ``tune/train_params.json`` on its run); after the study the best trial's network is
rebuilt from them with `train`'s own ``build_model`` and logged by `train`'s own ``log_final_model`` into the
best trial's run (calibrated on its training images, validated on the validation split).
"""

from __future__ import annotations

import json
import logging
import pathlib
import tempfile
import warnings

from carclf.tuning.progress import rank

log = logging.getLogger(__name__)

TRIAL_ARTIFACTS = "tune"
WEIGHTS_FILE = "model.weights.h5"
PARAMS_FILE = "train_params.json"
TAG_MODEL_URI = "carclf.model_uri"


def save_trial_weights(client, run_id: str, model, params: dict, workdir) -> None:
    """A finished trial's final weights and `train` arguments, as artifacts of its run (on an executor)."""
    if model is None:
        raise RuntimeError("train returned no model to keep (trials train in one process: workers=1)")
    folder = pathlib.Path(workdir) / "trial-model"
    folder.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(folder / WEIGHTS_FILE))
    (folder / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True, default=str))
    client.log_artifacts(run_id, str(folder), TRIAL_ARTIFACTS)


def log_champion_model(client, run_id: str, train_data: str, val_data: str) -> str:
    """Log the trial's model into the trial's run as `train` would have; returns its model URI.

    Once per trial run: a resumed study whose best trial did not change keeps the model logged before."""
    import mlflow

    from carclf.cli.step_config import resolve_config
    from carclf.data.input_pipeline import HDF5Source
    from carclf.training.config import TrainConfig
    from carclf.training.model import build_model
    from carclf.training.outputs import log_final_model

    logged = client.get_run(run_id).data.tags.get(TAG_MODEL_URI)
    if logged:
        return logged
    with tempfile.TemporaryDirectory(prefix="carclf-champion-") as tmp:
        try:
            local = pathlib.Path(client.download_artifacts(run_id, TRIAL_ARTIFACTS, tmp))
            params = json.loads((local / PARAMS_FILE).read_text())
        except Exception as exc:
            from carclf.tuning.spark_study import TuneError

            raise TuneError(
                f"best trial run {run_id}: its weights and parameters ({TRIAL_ARTIFACTS}/) cannot be read: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        config = resolve_config(
            TrainConfig, train_data=train_data, val_data=val_data, registered_model_name="", **params
        )
        train_source, val_source = HDF5Source.open(train_data), HDF5Source.open(val_data)
        model = build_model(config, train_source.num_classes, train_source.image_size)
        model.load_weights(str(local / WEIGHTS_FILE))
        mlflow.start_run(run_id=run_id, nested=True)
        try:
            info = log_final_model(model, config, train_source, val_source)
        finally:
            mlflow.end_run("FINISHED")  # the trial's own state: it completed, whatever happens here
    return info["model_uri"]


def register_best(client, model_uri: str, run_id: str, name: str, alias: str) -> str:
    """Register the best trial's model (once per trial run) and point ``alias`` at that version."""
    import mlflow

    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
    version = str(existing[0].version) if existing else str(mlflow.register_model(model_uri, name).version)
    client.set_registered_model_alias(name, alias, version)
    return version


def log_study_plots(client, run_id: str, trials, out_dir: str = "plots") -> list[str]:
    """Optimization history, parameter importances and parallel coordinates as PNG on the study run."""
    import optuna
    from optuna.trial import TrialState

    from carclf.reporting.figures import _pyplot

    plt = _pyplot()
    finished = [
        t
        for t in trials
        if t.state in (TrialState.PRUNED, TrialState.FAIL) or (t.state == TrialState.COMPLETE and t.value is not None)
    ]
    study = optuna.create_study(direction="maximize")
    study.add_trials(sorted(finished, key=lambda t: t.number))  # numbered as added: keep the study's order
    logged = []
    from optuna.visualization import matplotlib as oplt

    for name, plot in (
        ("optimization_history", oplt.plot_optimization_history),
        ("param_importances", oplt.plot_param_importances),
        ("parallel_coordinate", oplt.plot_parallel_coordinate),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning
                axes = plot(study)
        except Exception as exc:  # e.g. importances need two complete trials that differ
            log.info("plot %s skipped: %s", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        axes = axes.flat[0] if hasattr(axes, "flat") else axes
        if name == "optimization_history":
            axes.set_ylabel("val top-1")
        figure = axes.figure
        figure.set_size_inches(max(8, figure.get_size_inches()[0]), max(5, figure.get_size_inches()[1]))
        figure.tight_layout()
        client.log_figure(run_id, figure, f"{out_dir}/{name}.png")
        plt.close(figure)
        logged.append(f"{out_dir}/{name}.png")
    return logged


def _evaluate_on_test(model_uri: str, test_data, batch_size: int = 64) -> dict:
    """The best model on the test set, logged on the active (study) run like `evaluate` does."""
    import carclf_flavor
    from carclf.data.input_pipeline import HDF5Source, make_dataset
    from carclf.reporting.metrics import collect_predictions
    from carclf.reporting.test_report import log_test_report

    source = HDF5Source.open(test_data)
    classifier = carclf_flavor.load_model(model_uri)
    batches = make_dataset(source, batch_size, shuffle=False, epochs=1, with_indices=True).as_numpy_iterator()
    predictions = collect_predictions(classifier.predict_pixels, batches)
    metrics = log_test_report(predictions, source, list(source.class_names))
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def summarise(
    client,
    study_run_id,
    launcher_id,
    study_name,
    trials,
    data: tuple[str, str, str],
    registered_model_name,
    alias,
    failed_tasks,
) -> dict:
    """Counts and plots on the study run; the best trial's model logged, registered and tested; the summary.

    ``data``: (train_data, val_data, test_data), as the trials saw them."""
    import mlflow
    from optuna.trial import TrialState

    from carclf.tuning.spark_study import TuneError

    train_data, val_data, test_data = data

    counts = {
        state.name.lower(): sum(1 for t in trials if t.state == state)
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    plots = log_study_plots(client, study_run_id, trials)
    if not complete:
        raise TuneError(
            f"study {study_name!r}: no trial completed ({counts['fail']} failed, {counts['pruned']} "
            f"pruned){'; ' + failed_tasks if failed_tasks else ''}; see the child runs' carclf.error"
        )
    best = max(complete, key=rank)
    model_uri = log_champion_model(client, best._trial_id, train_data, val_data)
    best_run = client.get_run(best._trial_id)
    version = None
    if registered_model_name:
        version = register_best(client, model_uri, best._trial_id, registered_model_name, alias)
        model_uri = f"models:/{registered_model_name}/{version}"
    val = {"val_top1": best.value}
    for key, name in (("val_top5", "val_top5"), ("val_loss", "val_loss")):
        if key in best_run.data.metrics:
            val[name] = best_run.data.metrics[key]
    mlflow.log_metrics(val)
    test_metrics = _evaluate_on_test(model_uri, test_data) if test_data else {}
    tags = {
        "carclf.best_trial_run": best._trial_id,
        "carclf.best_trial_number": str(best.number),
        "carclf.model_uri": model_uri,
        "carclf.best_params": json.dumps(best.params, default=str)[:4000],
    }
    if version is not None:
        tags.update(
            {
                "carclf.registered_model": registered_model_name,
                "carclf.registered_version": version,
                "carclf.registered_alias": alias,
            }
        )
    mlflow.set_tags(tags)
    if launcher_id != study_run_id:  # a resumed study: the rerun's own run points at the results too
        for key, value in tags.items():
            client.set_tag(launcher_id, key, value)
    mlflow.end_run("FINISHED")
    return {
        "study_name": study_name,
        "study_run_id": study_run_id,
        "best_trial": best.number,
        "best_run_id": best._trial_id,
        "best_value": best.value,
        "best_params": best.params,
        "model_uri": model_uri,
        "registered_version": version,
        "val_metrics": val,
        "test_metrics": test_metrics,
        "counts": counts,
        "plots": plots,
    }
