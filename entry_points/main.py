"""`main`: preprocess -> augment -> train (or tune) -> evaluate (-> deploy) as child runs of one parent run.

Follows MLflow's examples/multistep_workflow: each step runs through ``mlflow.projects.run(...,
env_manager="local")`` and hands its outputs to the next by path or model URI. A step whose last
FINISHED run had the same parameters, the same code version and the same inputs (fingerprints of the
files it read) and whose outputs are still on disk unchanged is reused instead of recomputed;
``--force true`` recomputes everything. ``tune_trials > 0`` replaces `train` by a `tune` study of that many
trials (``tune_parallel`` at once, the default or ``tune_space`` search space); its champion is evaluated.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pathlib
import shlex
import sys
from typing import Optional

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from entry_points.cli_args import parse_bool, parse_int

log = logging.getLogger("carclf.main")
PROJECT_DIR = pathlib.Path(__file__).resolve().parents[1]

TAG_INPUTS = "carclf.inputs_fingerprint"
TAG_OUTPUTS = "carclf.outputs"
TAG_CODE = "carclf.code_fingerprint"
TAG_REUSED = "carclf.reused_run_"


class StepFailed(RuntimeError):
    """A child step ended in a state other than FINISHED."""


def file_fingerprint(path: os.PathLike | str) -> str:
    """Cheap identity of a file or folder tree: names, sizes and modification times (no content read)."""
    path = pathlib.Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = child.stat()
            digest.update(f"{child.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    elif path.exists():
        stat = path.stat()
        digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    else:
        digest.update(b"<missing>")
    return digest.hexdigest()


def code_fingerprint() -> str:
    """Identity of the project's code: a finished run of older code is not reused."""
    digest = hashlib.sha256()
    for folder in ("carclf_flavor", "entry_points"):
        for source in sorted((PROJECT_DIR / folder).rglob("*.py")):
            digest.update(source.relative_to(PROJECT_DIR).as_posix().encode())
            digest.update(source.read_bytes())
    digest.update((PROJECT_DIR / "MLproject").read_bytes())
    return digest.hexdigest()


def _outputs_unchanged(run) -> bool:
    recorded = run.data.tags.get(TAG_OUTPUTS)
    if recorded is None:
        return False
    return all(file_fingerprint(path) == fingerprint for path, fingerprint in json.loads(recorded).items())


def _same_param(logged: Optional[str], value: str) -> bool:
    # `mlflow run` logs parameters as they were quoted for the shell ('' for an empty string).
    return logged is not None and (logged == value or logged == shlex.quote(value))


def find_reusable_run(client: MlflowClient, experiment_id: str, entry_point: str, parameters: dict,
                      inputs_fingerprint: str, code: str):
    """The newest FINISHED run of ``entry_point`` with equal parameters, inputs and code, outputs intact."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{mlflow_tags.MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}' "
                      f"and tags.`{TAG_INPUTS}` = '{inputs_fingerprint}' and tags.`{TAG_CODE}` = '{code}' "
                      f"and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        if all(_same_param(run.data.params.get(k), v) for k, v in parameters.items()) and _outputs_unchanged(run):
            return run
    return None


def run_step(entry_point: str, parameters: dict, inputs: list, outputs: list, *, force: bool, code: str,
             experiment_id: str):
    """Run one step as a child run (or reuse a finished identical one); returns the MLflow run."""
    client = MlflowClient()
    parameters = {k: str(v) for k, v in parameters.items()}
    fingerprint = hashlib.sha256(
        json.dumps({str(p): file_fingerprint(p) for p in inputs}, sort_keys=True).encode()
    ).hexdigest()
    if not force:
        reusable = find_reusable_run(client, experiment_id, entry_point, parameters, fingerprint, code)
        if reusable is not None:
            log.info("step %s: reusing finished run %s (same parameters, inputs and code)",
                     entry_point, reusable.info.run_id)
            mlflow.set_tag(TAG_REUSED + entry_point, reusable.info.run_id)
            return reusable
    log.info("step %s: running with %s", entry_point, parameters)
    submitted = mlflow.projects.run(
        str(PROJECT_DIR), entry_point=entry_point, parameters=parameters, env_manager="local",
        experiment_id=experiment_id, synchronous=False,
    )
    succeeded = submitted.wait()
    run = client.get_run(submitted.run_id)
    if not succeeded or run.info.status != RunStatus.to_string(RunStatus.FINISHED):
        raise StepFailed(f"step '{entry_point}' failed (run {submitted.run_id}, status {run.info.status})")
    client.set_tag(run.info.run_id, TAG_INPUTS, fingerprint)
    client.set_tag(run.info.run_id, TAG_CODE, code)
    client.set_tag(run.info.run_id, TAG_OUTPUTS, json.dumps({str(p): file_fingerprint(p) for p in outputs}))
    return client.get_run(run.info.run_id)


def registered_version_of(run) -> Optional[str]:
    """The model version that a train run registered, if any."""
    versions = MlflowClient().search_model_versions(f"run_id = '{run.info.run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def pipeline(
    data_dir: str = "",
    output_dir: str = "data",
    image_size: int = 64,
    crop: str = "bbox",
    copies: int = 1,
    ops: str = "crop,pad,flip",
    spark_master: str = "local[*]",
    depth: int = 18,
    width: float = 0.25,
    weights: str = "none",
    epochs: int = 20,
    head_epochs: int = 0,
    batch_size: int = 16,
    learning_rate: float = 0.003,
    optimizer: str = "adam",
    registered_model_name: str = "carclf",
    deploy_target: str = "",
    deploy_name: str = "carclf-sample",
    force: bool = False,
    seed: int = 0,
    tune_trials: int = 0,
    tune_parallel: int = 2,
    tune_space: str = "",
) -> dict:
    """Run the whole pipeline inside the active (parent) run; returns the child run ids and the model URI."""
    active = mlflow.active_run()
    experiment_id = active.info.experiment_id
    code = code_fingerprint()
    out = pathlib.Path(output_dir).resolve()
    processed = out / "processed"
    train_h5, val_h5, test_h5 = processed / "train.h5", processed / "val.h5", processed / "test.h5"
    runs = {}

    data_inputs = [data_dir] if data_dir else []
    runs["preprocess"] = run_step(
        "preprocess",
        {"data_dir": data_dir, "output_dir": processed, "image_size": image_size, "crop": crop, "seed": seed},
        data_inputs, [train_h5, val_h5, test_h5], force=force, code=code, experiment_id=experiment_id,
    )
    train_files = [train_h5]
    if copies > 0:
        augmented = processed / "train_aug.h5"
        runs["augment"] = run_step(
            "augment",
            {"input": train_h5, "output": augmented, "copies": copies, "ops": ops,
             "spark_master": spark_master, "seed": seed},
            [train_h5], [augmented], force=force, code=code, experiment_id=experiment_id,
        )
        # The augmented file keeps the originals (keep_original=true), so it replaces train.h5.
        train_files = [augmented]
    if tune_trials > 0:
        runs["tune"] = run_step(
            "tune",
            {"train_data": ",".join(map(str, train_files)), "val_data": val_h5, "test_data": test_h5,
             "trials": tune_trials, "parallel": tune_parallel, "space": tune_space, "spark_master": spark_master,
             "registered_model_name": registered_model_name},
            [*train_files, val_h5, test_h5, *([tune_space] if tune_space else [])], [], force=force, code=code,
            experiment_id=experiment_id,
        )
        model_uri = runs["tune"].data.tags["carclf.model_uri"]
    else:
        runs["train"] = run_step(
            "train",
            {"train_data": ",".join(map(str, train_files)), "val_data": val_h5, "test_data": test_h5,
             "depth": depth, "width": width, "weights": weights, "epochs": epochs, "head_epochs": head_epochs,
             "batch_size": batch_size, "learning_rate": learning_rate, "optimizer": optimizer,
             "registered_model_name": registered_model_name, "seed": seed,
             "checkpoint_dir": out / "checkpoints" / "train"},
            [*train_files, val_h5, test_h5], [], force=force, code=code, experiment_id=experiment_id,
        )
        version = registered_version_of(runs["train"])
        model_uri = (f"models:/{registered_model_name}/{version}" if version
                     else f"runs:/{runs['train'].info.run_id}/model")
    runs["evaluate"] = run_step(
        "evaluate", {"model_uri": model_uri, "test_data": test_h5},
        [test_h5], [], force=force, code=code, experiment_id=experiment_id,
    )
    if deploy_target:
        runs["deploy"] = run_step(
            "deploy", {"model_uri": model_uri, "target": deploy_target, "name": deploy_name},
            [], [], force=True, code=code, experiment_id=experiment_id,
        )
    test_metrics = {k: v for k, v in runs["evaluate"].data.metrics.items() if k.startswith("test_")}
    mlflow.log_metrics({f"evaluate_{k}": v for k, v in test_metrics.items()})
    mlflow.set_tags({f"carclf.child_run.{name}": run.info.run_id for name, run in runs.items()})
    mlflow.set_tag("carclf.model_uri", model_uri)
    return {"runs": {name: run.info.run_id for name, run in runs.items()}, "model_uri": model_uri,
            "metrics": test_metrics, "test_images": str(test_h5)}


def next_commands(model_uri: str, sample_photo: Optional[str]) -> str:
    lines = [
        "Next steps:",
        f"  mlflow models serve -m {model_uri} --env-manager local -p 5000",
    ]
    if sample_photo:
        lines.append(f"  python -m entry_points.score --url http://127.0.0.1:5000 {sample_photo}")
    lines.append("  mlflow ui --backend-store-uri sqlite:///mlflow.db")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m entry_points.main", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="", help="Stanford Cars or folder-per-class root; empty = sample data")
    p.add_argument("--output-dir", default="data")
    p.add_argument("--image-size", type=parse_int, default=64)
    p.add_argument("--crop", default="bbox", choices=["bbox", "none"])
    p.add_argument("--copies", type=parse_int, default=1, help="augmented copies per image; 0 skips augmentation")
    p.add_argument("--ops", default="crop,pad,flip")
    p.add_argument("--spark-master", default="local[*]")
    p.add_argument("--depth", type=parse_int, default=18)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--weights", default="none")
    p.add_argument("--epochs", type=parse_int, default=20)
    p.add_argument("--head-epochs", type=parse_int, default=0)
    p.add_argument("--batch-size", type=parse_int, default=16)
    p.add_argument("--learning-rate", type=float, default=0.003)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--registered-model-name", default="carclf")
    p.add_argument("--deploy-target", default="")
    p.add_argument("--deploy-name", default="carclf-sample")
    p.add_argument("--force", type=parse_bool, default=False)
    p.add_argument("--seed", type=parse_int, default=0)
    p.add_argument("--tune-trials", type=parse_int, default=0, help="> 0: a tune study instead of one train run")
    p.add_argument("--tune-parallel", type=parse_int, default=2)
    p.add_argument("--tune-space", default="", help="YAML search space for tune; empty = tune's default")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    launched_by_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))  # start_run() consumes the variable
    with mlflow.start_run() as parent:
        if not launched_by_mlflow_run:  # under `mlflow run` the parameters are logged already
            mlflow.log_params(vars(args))
        try:
            result = pipeline(**vars(args))
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


def sample_photo_for(data_dir: str) -> Optional[str]:
    """A photo a newcomer can score right away: the first test image of the data used."""
    root = pathlib.Path(data_dir) if data_dir else None
    if root is None:
        try:
            from entry_points.sample_data import default_sample_dir

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
