"""`evaluate`: score a logged carclf model on a test HDF5 split and log the report to a new MLflow run.

Two input paths, same metrics:
- ``input="hdf5"`` (default): the preprocessed uint8 pixels of the HDF5 file, streamed in batches through the
  model loaded with ``carclf_flavor.load_model``.
- ``input="jpeg"``: the ORIGINAL photo files named in the HDF5 ``filenames`` (with their ``bboxes``), sent as
  encoded bytes through the model's ``python_function`` flavor, exactly as ``mlflow models serve`` receives
  them. It checks the serving path end to end: same preprocessing -> same top-1 as the HDF5 path.

Metrics ``test_top1``, ``test_top5``, ``test_macro_f1``, ``test_num_images``; artifacts
``evaluation/confusion_matrix.png``, ``evaluation/per_class_accuracy.csv``,
``evaluation/misclassified_gallery.png`` (each mistake beside its Grad-CAM heatmap for the wrong guess); tags
link the model URI and the run that produced the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys

import numpy as np

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import param, resolve_config, run_step
from carclf.data.hdf5_dataset import DatasetError
from carclf.data.input_pipeline import HDF5Source
from carclf.reporting.reports import TOP_K, Predictions, collect_predictions, format_table, log_test_report
from carclf.tracking.runs import log_new_params

log = logging.getLogger(__name__)
INPUTS = ("hdf5", "jpeg")
TAG_MODEL_URI = "carclf.evaluated_model_uri"
TAG_SOURCE_RUN = "carclf.model_source_run_id"


class EvaluateError(ValueError):
    """A model/test set mismatch or an unusable input; the message names it."""


def model_source_run(model_uri: str) -> str | None:
    """The run that logged the model behind ``model_uri`` (runs:/, models:/name/version, models:/m-id, path)."""
    import mlflow

    try:
        return mlflow.models.get_model_info(model_uri).run_id
    except Exception as exc:  # an unknown URI is reported by load_model with MLflow's own message
        log.debug("no source run for %s: %s", model_uri, exc)
        return None


def _check_model_matches(classifier, source: HDF5Source) -> None:
    if list(source.class_names) != list(classifier.class_names):
        raise EvaluateError(
            f"{source.paths[0]}: its {source.num_classes} classes differ from the model's "
            f"{len(classifier.class_names)} classes"
        )
    if int(classifier.settings.image_size) != source.image_size:
        raise EvaluateError(
            f"{source.paths[0]}: images are {source.image_size} px but the model takes "
            f"{classifier.settings.image_size} px"
        )


def _resolve_image(name: str, image_root: pathlib.Path | None, h5_path: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(name)
    if path.is_absolute():
        return path
    for base in ([image_root] if image_root else []) + [h5_path.parent]:
        candidate = base / path
        if candidate.is_file():
            return candidate
    return (image_root or h5_path.parent) / path


def predict_jpeg_files(pyfunc_model, source: HDF5Source, image_root=None, batch_size: int = 64) -> Predictions:
    """Send the original photos of ``source`` (bytes + bbox columns) through a pyfunc model, in file order."""
    import h5py
    import pandas as pd

    from carclf_flavor import BBOX_COLUMNS, IMAGE_COLUMN

    image_root = pathlib.Path(image_root) if image_root else None
    index_of = {name: i for i, name in enumerate(source.class_names)}
    labels, classes, probs, indices = [], [], [], []
    offset = 0
    for info in source.infos:
        with h5py.File(info.path, "r") as f:
            for start in range(0, info.num_images, batch_size):
                stop = min(info.num_images, start + batch_size)
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["filenames"][start:stop]]
                bboxes = f["bboxes"][start:stop]
                photos = []
                for name in names:
                    path = _resolve_image(name, image_root, info.path)
                    if not path.is_file():
                        raise EvaluateError(
                            f"{info.path}: source image {name} not found (looked in {path.parent}; set image_root)"
                        )
                    photos.append(path.read_bytes())
                frame = pd.DataFrame({IMAGE_COLUMN: photos})
                if info.settings.crop == "bbox":
                    for column, values in zip(BBOX_COLUMNS, np.asarray(bboxes).T):
                        frame[column] = values.astype(np.float64)
                out = pyfunc_model.predict(frame, params={"top_k": TOP_K})
                ranked = out["top_k"].tolist()
                classes.append(np.array([[index_of[e["label"]] for e in row] for row in ranked], np.int32))
                probs.append(np.array([[e["prob"] for e in row] for row in ranked], np.float32))
                labels.append(f["labels"][start:stop].astype(np.int32))
                indices.append(np.arange(offset + start, offset + stop, dtype=np.int64))
        offset += info.num_images
    if not labels:
        raise EvaluateError("the test set has no images")
    return Predictions(np.concatenate(labels), np.concatenate(classes), np.concatenate(probs), np.concatenate(indices))


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` step's parameters (CLI flags, MLproject parameters and keyword arguments alike)."""

    model_uri: str = param(help="models:/carclf/1, runs:/<run>/model, a path, ...")
    test_data: str = param(help="HDF5 file(s), comma-separated")
    batch_size: int = param(64, "images per prediction batch")
    input: str = param(
        "hdf5", "hdf5: preprocessed pixels; jpeg: the original photos through the served pyfunc path", choices=INPUTS
    )
    image_root: str = param("", "folder that relative `filenames` are under (input=jpeg)")
    gallery_size: int = param(16, "misclassified photos shown in the gallery")


def evaluate(config: EvaluateConfig | None = None, **overrides) -> dict:
    """Evaluate ``model_uri`` on ``test_data`` (one or several comma-separated HDF5 files) in a new run.

    Takes an ``EvaluateConfig`` or its fields as keywords (``evaluate(model_uri=..., test_data=...)``).
    """
    c = resolve_config(EvaluateConfig, config, **overrides)
    model_uri, test_data, batch_size, input, image_root, gallery_size = (  # noqa: A001 - the MLproject name
        c.model_uri,
        c.test_data,
        c.batch_size,
        c.input,
        c.image_root,
        c.gallery_size,
    )
    import mlflow

    import carclf_flavor

    if input not in INPUTS:
        raise EvaluateError(f"input must be one of {INPUTS}, got {input!r}")
    if int(batch_size) < 1:
        raise EvaluateError(f"batch_size must be >= 1, got {batch_size}")
    source = HDF5Source.open(test_data)
    classifier = carclf_flavor.load_model(model_uri)
    _check_model_matches(classifier, source)
    source_run = model_source_run(model_uri)

    active = mlflow.active_run()
    run = active or mlflow.start_run()
    try:
        log_new_params(
            {
                "model_uri": model_uri,
                "test_data": ",".join(map(str, source.paths)),
                "batch_size": int(batch_size),
                "input": input,
            }
        )
        tags = {TAG_MODEL_URI: model_uri, "carclf.inference_precision": classifier.precision}
        if source_run:
            tags[TAG_SOURCE_RUN] = source_run
        mlflow.set_tags(tags)
        from entry_points.train import log_dataset_inputs

        log_dataset_inputs(source, "testing")
        if input == "hdf5":
            predictions = collect_predictions(classifier.predict_pixels, source, int(batch_size))
        else:
            pyfunc_model = mlflow.pyfunc.load_model(model_uri)
            predictions = predict_jpeg_files(pyfunc_model, source, image_root or None, int(batch_size))
        from carclf.reporting.gradcam import GradCAM

        metrics = log_test_report(
            predictions,
            source,
            list(source.class_names),
            gallery_size=int(gallery_size),
            heatmap_fn=GradCAM(classifier.model),
        )
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tag("carclf.error", f"{type(exc).__name__}: {exc}".splitlines()[0][:4000])
        mlflow.end_run("FAILED")
        raise
    if active is None:
        mlflow.end_run("FINISHED")
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {
        "run_id": run.info.run_id,
        "metrics": scalars,
        "predictions": predictions,
        "per_class_accuracy": metrics["per_class_accuracy"],
    }


_PROG = "python -m entry_points.evaluate"


def build_parser() -> argparse.ArgumentParser:
    return build_parser_for(EvaluateConfig, _PROG, __doc__.splitlines()[0])


def _error_line(exc: BaseException, config: EvaluateConfig) -> str | None:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (EvaluateError, DatasetError)):
        return str(exc)
    if isinstance(exc, MlflowException):
        return f"{config.model_uri}: {str(exc.message).splitlines()[0]}"
    return None


def _print_result(result: dict, config: EvaluateConfig) -> None:
    print(f"evaluation run {result['run_id']} of {config.model_uri} on {config.test_data} ({config.input})")
    print(format_table(result["metrics"]))


def main(argv=None) -> int:
    return run_step(
        evaluate,
        EvaluateConfig,
        _PROG,
        __doc__.splitlines()[0],
        argv,
        error_line=_error_line,
        print_result=_print_result,
    )


if __name__ == "__main__":
    sys.exit(main())
