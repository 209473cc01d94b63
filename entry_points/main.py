"""`main`: preprocess -> augment -> train (or tune) -> evaluate (-> deploy) as child runs of one parent run.

Follows MLflow's examples/multistep_workflow: each step runs through ``mlflow.projects.run(...,
env_manager="local")`` and hands its outputs to the next by path or model URI. A step whose last
FINISHED run had the same parameters, the same code version and the same inputs (fingerprints of the
files it read) and whose outputs are still on disk unchanged is reused instead of recomputed;
``--force true`` recomputes everything. ``tune_trials > 0`` replaces `train` by a `tune` study of that many
trials (``tune_parallel`` at once, the default or ``tune_space`` search space); its champion is evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import sys

import mlflow

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import config_from_args, param, resolve_config
from carclf.tracking.child_steps import StepFailed, code_fingerprint, registered_version_of, run_child_step
from carclf.tracking.run_owner import claim_run
from carclf.training.validation import OPTIMIZERS
from carclf_flavor.images import CROP_MODES

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MainConfig:
    """The whole pipeline's parameters (carclf.cli.step_config: each default written once, here).

    Its training defaults are a small network from scratch, sized for the bundled sample data.
    """

    data_dir: str = param("", "Stanford Cars or folder-per-class root; empty = sample data")
    output_dir: str = param("data", "where processed/, augmented data and checkpoints go")
    image_size: int = param(64, "pixels per side of the HDF5 images and the network input")
    crop: str = param("bbox", "crop to the bounding box, or keep the whole photo", choices=CROP_MODES)
    copies: int = param(1, "augmented copies per image; 0 skips augmentation")
    ops: str = param("crop,pad,flip", "augment's operations, comma-separated")
    spark_master: str = param("local[*]", "Spark master of augment (and tune)")
    depth: int = param(18, "ResNet depth")
    width: float = param(0.25, "channel width multiplier")
    weights: str = param("none", "imagenet | none | path to a weights file")
    epochs: int = param(20, "training epochs")
    head_epochs: int = param(0, "head-phase epochs")
    batch_size: int = param(16, "global batch")
    learning_rate: float = param(0.003, "learning rate")
    optimizer: str = param("adam", "optimizer", choices=OPTIMIZERS)
    registered_model_name: str = param("carclf", "registered model name; empty: do not register")
    deploy_target: str = param("", "deploy the model there at the end (e.g. carclf-local); empty: no deploy")
    deploy_name: str = param("carclf-sample", "deployment name")
    force: bool = param(False, "recompute every step, even when a finished run could be reused")
    seed: int = param(0, "seed of every step")
    tune_trials: int = param(0, "> 0: a tune study instead of one train run")
    tune_parallel: int = param(2, "tune trials at once")
    tune_space: str = param("", "YAML search space for tune; empty = tune's default")


def pipeline(config: MainConfig | None = None, **overrides) -> dict:
    """Run the whole pipeline inside the active (parent) run; returns the child run ids and the model URI."""
    c = resolve_config(MainConfig, config, **overrides)
    (
        data_dir,
        output_dir,
        image_size,
        crop,
        copies,
        ops,
        spark_master,
        depth,
        width,
        weights,
        epochs,
        head_epochs,
        batch_size,
        learning_rate,
        optimizer,
        registered_model_name,
        deploy_target,
        deploy_name,
        force,
        seed,
        tune_trials,
        tune_parallel,
        tune_space,
    ) = (getattr(c, f.name) for f in dataclasses.fields(MainConfig))
    active = mlflow.active_run()
    experiment_id = active.info.experiment_id
    code = code_fingerprint()
    out = pathlib.Path(output_dir).resolve()
    processed = out / "processed"
    train_h5, val_h5, test_h5 = processed / "train.h5", processed / "val.h5", processed / "test.h5"
    runs = {}

    data_inputs = [data_dir] if data_dir else []
    runs["preprocess"] = run_child_step(
        "preprocess",
        {"data_dir": data_dir, "output_dir": processed, "image_size": image_size, "crop": crop, "seed": seed},
        data_inputs,
        [train_h5, val_h5, test_h5],
        force=force,
        code=code,
        experiment_id=experiment_id,
    )
    train_files = [train_h5]
    if copies > 0:
        augmented = processed / "train_aug.h5"
        runs["augment"] = run_child_step(
            "augment",
            {
                "input": train_h5,
                "output": augmented,
                "copies": copies,
                "ops": ops,
                "spark_master": spark_master,
                "seed": seed,
            },
            [train_h5],
            [augmented],
            force=force,
            code=code,
            experiment_id=experiment_id,
        )
        # The augmented file keeps the originals (keep_original=true), so it replaces train.h5.
        train_files = [augmented]
    if tune_trials > 0:
        runs["tune"] = run_child_step(
            "tune",
            {
                "train_data": ",".join(map(str, train_files)),
                "val_data": val_h5,
                "test_data": test_h5,
                "trials": tune_trials,
                "parallel": tune_parallel,
                "space": tune_space,
                "spark_master": spark_master,
                "registered_model_name": registered_model_name,
            },
            [*train_files, val_h5, test_h5, *([tune_space] if tune_space else [])],
            [],
            force=force,
            code=code,
            experiment_id=experiment_id,
        )
        model_uri = runs["tune"].data.tags["carclf.model_uri"]
    else:
        runs["train"] = run_child_step(
            "train",
            {
                "train_data": ",".join(map(str, train_files)),
                "val_data": val_h5,
                "test_data": test_h5,
                "depth": depth,
                "width": width,
                "weights": weights,
                "epochs": epochs,
                "head_epochs": head_epochs,
                "batch_size": batch_size,
                "learning_rate": learning_rate,
                "optimizer": optimizer,
                "registered_model_name": registered_model_name,
                "seed": seed,
                "checkpoint_dir": out / "checkpoints" / "train",
            },
            [*train_files, val_h5, test_h5],
            [],
            force=force,
            code=code,
            experiment_id=experiment_id,
        )
        version = registered_version_of(runs["train"])
        model_uri = (
            f"models:/{registered_model_name}/{version}" if version else f"runs:/{runs['train'].info.run_id}/model"
        )
    runs["evaluate"] = run_child_step(
        "evaluate",
        {"model_uri": model_uri, "test_data": test_h5},
        [test_h5],
        [],
        force=force,
        code=code,
        experiment_id=experiment_id,
    )
    if deploy_target:
        runs["deploy"] = run_child_step(
            "deploy",
            {"model_uri": model_uri, "target": deploy_target, "name": deploy_name},
            [],
            [],
            force=True,
            code=code,
            experiment_id=experiment_id,
        )
    test_metrics = {k: v for k, v in runs["evaluate"].data.metrics.items() if k.startswith("test_")}
    mlflow.log_metrics({f"evaluate_{k}": v for k, v in test_metrics.items()})
    mlflow.set_tags({f"carclf.child_run.{name}": run.info.run_id for name, run in runs.items()})
    mlflow.set_tag("carclf.model_uri", model_uri)
    return {
        "runs": {name: run.info.run_id for name, run in runs.items()},
        "model_uri": model_uri,
        "metrics": test_metrics,
        "test_images": str(test_h5),
    }


def next_commands(model_uri: str, sample_photo: str | None, tracking_uri: str | None = None) -> str:
    """What to run next; the runs' UI is the one of the store they went to (``MLFLOW_TRACKING_URI``)."""
    import mlflow

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    lines = [
        "Next steps:",
        f"  mlflow models serve -m {model_uri} --env-manager local -p 5000",
    ]
    if sample_photo:
        lines.append(f"  python -m entry_points.score --url http://127.0.0.1:5000 {sample_photo}")
    scheme = tracking_uri.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        lines.append(f"  open {tracking_uri} (the tracking server's UI)")
    elif scheme in ("databricks", "azureml", "databricks-uc"):
        lines.append(f"  the runs are in {tracking_uri}: open them in that workspace's UI")
    else:
        lines.append(f"  mlflow ui --backend-store-uri {tracking_uri}")
    return "\n".join(lines)


def build_parser():
    return build_parser_for(MainConfig, "python -m entry_points.main", __doc__.splitlines()[0])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    launched_by_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))  # start_run() consumes the variable
    with mlflow.start_run() as parent:
        claim_run(parent, "main")
        if not launched_by_mlflow_run:  # under `mlflow run` the parameters are logged already
            mlflow.log_params(vars(args))
        try:
            result = pipeline(config_from_args(MainConfig, args))
        except StepFailed as exc:
            mlflow.set_tag("carclf.failed_step", str(exc))
            print(f"error: {exc}", file=sys.stderr)
            mlflow.end_run(status="FAILED")
            return 1
    print(f"\nPipeline finished (parent run {parent.info.run_id}).")
    for name, run_id in result["runs"].items():
        print(f"  {name:<10} run {run_id}")
    for name, value in sorted(result["metrics"].items()):
        print(f"  {name:<22} {value:.4f}")
    print(f"  model: {result['model_uri']}\n")
    print(next_commands(result["model_uri"], sample_photo_for(args.data_dir)))
    return 0


def sample_photo_for(data_dir: str) -> str | None:
    """A photo a newcomer can score right away: the first test image of the data used."""
    root = pathlib.Path(data_dir) if data_dir else None
    if root is None:
        try:
            from carclf.data.sample_data import default_sample_dir

            root = pathlib.Path(default_sample_dir())
        except Exception:
            return None
    for pattern in ("cars_test/*.jpg", "test/*/*.jpg", "*/*.jpg"):
        found = sorted(root.glob(pattern))
        if found:
            return str(found[0])
    return None


if __name__ == "__main__":
    sys.exit(main())
