"""Which images the int8 network is calibrated and validated on (carclf_flavor.log_model quantizes with them)."""

from __future__ import annotations

import numpy as np

from carclf.data.input_pipeline import HDF5Source

CALIBRATION_IMAGES = 256  # training images the int8 network is calibrated on (stratified by class)


def stratified_sample(source: HDF5Source, count: int, seed: int = 0) -> np.ndarray:
    """About ``count`` images of ``source``, the same number from every class (int8 calibration)."""
    import h5py

    labels = []
    for path in source.paths:
        with h5py.File(path, "r") as handle:
            labels.append(handle["labels"][:])
    labels = np.concatenate(labels)
    rng = np.random.default_rng(seed)
    per_class = max(1, count // source.num_classes)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(source.num_classes)]
    return source.read_rows(np.sort(np.concatenate(picked)))[0]
