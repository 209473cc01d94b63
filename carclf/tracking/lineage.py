"""Dataset lineage on a run: each input HDF5 file as an MLflow dataset input (path + sha256), and as tags."""

from __future__ import annotations

import warnings

from carclf.data.input_pipeline import HDF5Source
from carclf.files.fingerprint import file_sha256


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
        mlflow.log_input(
            dataset,
            context=context,
            tags={"sha256": digest, "num_images": str(info.num_images), "image_size": str(info.image_size)},
        )
        suffix = f".{index}" if len(source.infos) > 1 else ""
        mlflow.set_tags(
            {f"carclf.data.{context}{suffix}.path": str(path), f"carclf.data.{context}{suffix}.sha256": digest}
        )
