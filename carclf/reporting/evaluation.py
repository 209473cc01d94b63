"""Scoring a saved carclf model on a test HDF5 split: the checks, the source run, the served (JPEG) path.

Used by the `evaluate` step (``entry_points.evaluate``); the report itself is ``carclf.reporting.test_report``.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np

from carclf.data.input_pipeline import HDF5Source
from carclf.reporting.metrics import TOP_K, Predictions

log = logging.getLogger(__name__)


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


def check_model_matches(classifier, source: HDF5Source) -> None:
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
                out = pyfunc_model.predict(frame, params={"top_k": TOP_K, "top_k_format": "list"})
                ranked = out["top_k"].tolist()
                classes.append(np.array([[index_of[e["label"]] for e in row] for row in ranked], np.int32))
                probs.append(np.array([[e["prob"] for e in row] for row in ranked], np.float32))
                labels.append(f["labels"][start:stop].astype(np.int32))
                indices.append(np.arange(offset + start, offset + stop, dtype=np.int64))
        offset += info.num_images
    if not labels:
        raise EvaluateError("the test set has no images")
    return Predictions(np.concatenate(labels), np.concatenate(classes), np.concatenate(probs), np.concatenate(indices))
