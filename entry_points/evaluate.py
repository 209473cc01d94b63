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
import sys

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import param, resolve_config, run_step
from carclf.data.hdf5_dataset import DatasetError
from carclf.data.input_pipeline import HDF5Source, make_dataset
from carclf.reporting.evaluation import EvaluateError, check_model_matches, model_source_run, predict_jpeg_files
from carclf.reporting.metrics import collect_predictions, format_table
from carclf.reporting.test_report import log_test_report
from carclf.tracking.lineage import log_dataset_inputs
from carclf.tracking.runs import log_new_params, step_run

__all__ = ["EvaluateConfig", "EvaluateError", "build_parser", "evaluate", "main", "predict_jpeg_files"]

INPUTS = ("hdf5", "jpeg")
TAG_MODEL_URI = "carclf.evaluated_model_uri"
TAG_SOURCE_RUN = "carclf.model_source_run_id"
TAG_ERROR = "carclf.error"


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
    check_model_matches(classifier, source)
    source_run = model_source_run(model_uri)

    # `mlflow run`'s run is left to it; a run of its own ends FAILED / KILLED on errors
    with step_run("evaluate") as run:
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
            log_dataset_inputs(source, "testing")
            if input == "hdf5":
                batches = make_dataset(source, int(batch_size), shuffle=False, epochs=1, with_indices=True)
                predictions = collect_predictions(classifier.predict_pixels, batches.as_numpy_iterator())
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
        except Exception as exc:
            mlflow.set_tag(TAG_ERROR, f"{type(exc).__name__}: {exc}".splitlines()[0][:4000])
            raise
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
