"""Dataset lineage on a run: each input HDF5 file as an MLflow dataset input (path + sha256), and as tags."""

from __future__ import annotations

import time
import warnings

from carclf.data.input_pipeline import HDF5Source
from carclf.files.fingerprint import file_sha256

# MLflow's SQL store looks for the dataset row, then inserts it if missing: two runs logging the same new
# file at the same moment (`tune`'s parallel trials) race, and the one that inserts second fails on the
# unique key with its whole transaction rolled back. Retried, it finds the first one's row and only links it.
_DUPLICATE_KEY_MARKERS = ("IntegrityError", "UNIQUE constraint failed", "duplicate key value", "Duplicate entry")
DATASET_INSERT_ATTEMPTS = 4


def _is_duplicate_dataset_insert(exc: BaseException) -> bool:
    """True for a unique-key failure on MLflow's datasets table, from a local store or a tracking server."""
    seen = exc
    while seen is not None:
        text = str(seen)
        if "datasets" in text and any(marker in text for marker in _DUPLICATE_KEY_MARKERS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def log_input_despite_concurrent_runs(dataset, context: str, tags: dict) -> None:
    """``mlflow.log_input``, retried when another run inserted the same dataset in the meantime."""
    import mlflow

    for attempt in range(1, DATASET_INSERT_ATTEMPTS + 1):
        try:
            mlflow.log_input(dataset, context=context, tags=tags)
            return
        except mlflow.exceptions.MlflowException as exc:
            if attempt == DATASET_INSERT_ATTEMPTS or not _is_duplicate_dataset_insert(exc):
                raise
            time.sleep(0.05 * attempt)


def log_dataset_inputs(source: HDF5Source, context: str) -> None:
    """``mlflow.log_input`` of every file of ``source`` in ``context`` (training, validation, testing), with
    tags ``carclf.data.<context>[.<i>].path`` / ``.sha256`` on the active run."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for index, info in enumerate(source.infos):
        path = info.path.resolve()
        digest = file_sha256(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are local files
            dataset_source = resolve_dataset_source(path.as_uri())
        dataset = MetaDataset(source=dataset_source, name=path.name, digest=digest[:20])
        log_input_despite_concurrent_runs(
            dataset,
            context=context,
            tags={"sha256": digest, "num_images": str(info.num_images), "image_size": str(info.image_size)},
        )
        suffix = f".{index}" if len(source.infos) > 1 else ""
        mlflow.set_tags(
            {f"carclf.data.{context}{suffix}.path": str(path), f"carclf.data.{context}{suffix}.sha256": digest}
        )
