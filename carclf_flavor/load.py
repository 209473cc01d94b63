"""Loading a saved carclf model: ``load_model`` (a ``CarClassifier``) and ``_load_pyfunc`` (for ``mlflow.pyfunc``).

``_load_from_data_dir`` reads the ``data`` folder (see ``carclf_flavor.layout``) of a model saved by this or
any earlier version, and chooses the precision to serve in (``carclf_flavor.precision``).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

from carclf_flavor.classifier import CarClassifier
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.layout import CLASSES_FILE, DATA_SUBPATH, FLAVOR_NAME, MODEL_FILE, PREPROCESSING_FILE
from carclf_flavor.precision import choose_inference_precision
from carclf_flavor.pyfunc import RequestLimits, _CarClassifierPyfunc

# Serve-time override of the pixel limit (decompression-bomb guard) saved in preprocessing.json.
MAX_PIXELS_ENV_VAR = "CARCLF_MAX_PIXELS"

# A child of MLflow's logger: `mlflow models serve` shows its INFO lines, so the precision choice is visible.
_logger = logging.getLogger("mlflow.carclf")


def _register_custom_layers():
    """Importing the network modules registers their Keras layers (Scale, the input preprocessing layer)."""
    import importlib
    import importlib.util

    for module in ("carclf_flavor.layers", "carclf_flavor.resnet"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def _to_bfloat16(model):
    """The bf16 variant of the saved float32 fused network (weights cast once at load)."""
    from carclf_flavor.resnet import fuse_for_inference

    return fuse_for_inference(model, dtype="bfloat16")


def _load_from_data_dir(data_dir: str, model_config: dict | None = None) -> CarClassifier:
    import keras

    model_config = dict(model_config or {})
    data_dir = pathlib.Path(data_dir)
    names = json.loads((data_dir / CLASSES_FILE).read_text(encoding="utf-8"))
    record = json.loads((data_dir / PREPROCESSING_FILE).read_text(encoding="utf-8"))
    saved_precision = record.get("inference_precision", "float32")
    max_pixels = os.environ.get(MAX_PIXELS_ENV_VAR) or model_config.get("max_pixels")
    if max_pixels:
        record["max_pixels"] = int(float(max_pixels))
    settings = PreprocessSettings.from_dict(record)

    _register_custom_layers()
    model = keras.saving.load_model(str(data_dir / MODEL_FILE), compile=False, safe_mode=True)
    requested = model_config.get("inference_precision", saved_precision)
    from carclf_flavor import int8

    int8_report = int8.read_int8_report(data_dir)
    int8_available, int8_missing = int8.int8_network_available(data_dir, int8_report)
    precision, reason = choose_inference_precision(
        requested, int8_available=int8_available, int8_missing_reason=int8_missing
    )
    int8_network = None
    if precision == "bfloat16":
        model = _to_bfloat16(model)
    elif precision == "int8":
        int8_network = int8.load_int8_network(data_dir)
        validated = "validated" if int8_report.get("validated") else "NOT validated"
        reason += f" (OpenVINO, {int8_network.threads} threads; int8 {validated} when saved)"
    _logger.info("carclf model serving in %s: %s", precision, reason)
    return CarClassifier(
        model, names, settings, precision=precision, precision_reason=reason, int8_network=int8_network
    )


def load_model(model_uri, dst_path=None) -> CarClassifier:
    """Load a carclf model from any MLflow model URI (runs:/, models:/, a local path, ...)."""
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri
    from mlflow.utils.model_utils import _add_code_from_conf_to_system_path, _get_flavor_configuration

    local_path = _download_artifact_from_uri(artifact_uri=str(model_uri), output_path=dst_path)
    flavor_conf = _get_flavor_configuration(model_path=local_path, flavor_name=FLAVOR_NAME)
    _add_code_from_conf_to_system_path(local_path, flavor_conf)
    return _load_from_data_dir(os.path.join(local_path, flavor_conf.get("data", DATA_SUBPATH)))


def _load_pyfunc(path, model_config=None):
    """Called by ``mlflow.pyfunc.load_model`` with the ``data`` folder of the model."""
    path = pathlib.Path(path)
    if (path / "MLmodel").exists():
        path = path / DATA_SUBPATH
    classifier = _load_from_data_dir(str(path), model_config)
    limits = RequestLimits.from_environment(model_config)
    _logger.info("carclf requests default to errors=%s: %s", limits.default_errors, limits.errors_reason)
    return _CarClassifierPyfunc(classifier, limits)
