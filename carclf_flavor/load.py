"""Loading a saved carclf model: ``load_model`` (a ``CarClassifier``) and ``_load_pyfunc`` (for ``mlflow.pyfunc``).

``_load_from_data_dir`` reads the ``data`` folder (see ``carclf_flavor.layout``) of a model saved by this or
any earlier version, and chooses the precision to serve in (``carclf_flavor.precision``).

A model folder is checked before it serves: ``classes.json`` and ``preprocessing.json`` must be small UTF-8
JSON of the expected shape, in sane ranges, and agree with the network (one name per output, the image size
it takes). Anything else is a ``ModelFileError``: one line naming the file and the problem, at load, rather
than a failure (or a stack trace) in every request after it.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

from carclf_flavor.budget import PROCESS_DECODING
from carclf_flavor.classifier import CarClassifier
from carclf_flavor.errors import ModelFileError
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.layout import CLASSES_FILE, DATA_SUBPATH, FLAVOR_NAME, MODEL_FILE, PREPROCESSING_FILE
from carclf_flavor.precision import choose_inference_precision
from carclf_flavor.pyfunc import RequestLimits, _CarClassifierPyfunc

# Serve-time override of the pixel limit (decompression-bomb guard) saved in preprocessing.json.
MAX_PIXELS_ENV_VAR = "CARCLF_MAX_PIXELS"

# Bounds on what a model folder may ask of the server that loads it. The JSON files are a few KB in any real
# model (Stanford Cars: 196 names); image sizes outside this range are no ResNet input anyone trains.
MAX_JSON_FILE_BYTES = 16 * 1024 * 1024
MAX_CLASSES = 100_000
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 2048

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


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def read_model_json(path: pathlib.Path):
    """The JSON value in ``path``, a file of a saved model; ``ModelFileError`` naming it when it is missing,
    larger than ``MAX_JSON_FILE_BYTES``, not UTF-8 or not JSON."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_FILE_BYTES:
            raise ModelFileError(f"{path}: {size} bytes, above the {MAX_JSON_FILE_BYTES} a model's JSON file may hold")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_JSON_FILE_BYTES + 1)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{path}: not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def read_class_file(path: pathlib.Path) -> list[str]:
    """``classes.json``: a non-empty JSON list of distinct names, at most ``MAX_CLASSES``."""
    names = read_model_json(path)
    if not isinstance(names, list) or not names:
        raise ModelFileError(f"{path}: expected a non-empty JSON list of class names, got {type(names).__name__}")
    if len(names) > MAX_CLASSES:
        raise ModelFileError(f"{path}: {len(names)} class names, above the limit of {MAX_CLASSES}")
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise ModelFileError(f"{path}: class {index} is a {type(name).__name__}, not a name")
    if len(set(names)) != len(names):
        seen, duplicate = set(), None
        for name in names:
            if name in seen:
                duplicate = name
                break
            seen.add(name)
        raise ModelFileError(f"{path}: class name {duplicate!r} appears more than once")
    return names


def read_preprocessing_file(path: pathlib.Path, max_pixels=None) -> tuple[PreprocessSettings, str]:
    """``preprocessing.json``: (its settings, with ``max_pixels`` overridden when given; the saved precision)."""
    record = read_model_json(path)
    if not isinstance(record, dict):
        raise ModelFileError(f"{path}: expected a JSON object of preprocessing settings, got {type(record).__name__}")
    saved_precision = record.get("inference_precision", "float32")
    if max_pixels:
        record["max_pixels"] = int(float(max_pixels))
    try:
        settings = PreprocessSettings.from_dict(record)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: {_first_line(exc)}") from None
    if not MIN_IMAGE_SIZE <= int(settings.image_size) <= MAX_IMAGE_SIZE:
        raise ModelFileError(f"{path}: image_size {settings.image_size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    return settings, str(saved_precision)


def check_network_agrees(model, model_path: pathlib.Path, classes_path, preprocessing_path, names, settings):
    """One class name per output of the network, and the image size it takes; else ``ModelFileError``."""
    input_shape = tuple(model.inputs[0].shape)
    outputs = int(tuple(model.outputs[0].shape)[-1])
    if outputs != len(names):
        raise ModelFileError(
            f"{classes_path}: {len(names)} class names but the network in {model_path.name} has {outputs} outputs"
        )
    if len(input_shape) != 4 or input_shape[3] != 3:
        raise ModelFileError(f"{model_path}: the network takes {input_shape[1:]} inputs, not (size, size, 3) photos")
    if input_shape[1] is not None and input_shape[1:3] != (settings.image_size, settings.image_size):
        raise ModelFileError(
            f"{preprocessing_path}: image_size {settings.image_size} but the network in {model_path.name} takes "
            f"{input_shape[1]}x{input_shape[2]} images"
        )


def _load_from_data_dir(data_dir: str, model_config: dict | None = None) -> CarClassifier:
    import keras

    model_config = dict(model_config or {})
    data_dir = pathlib.Path(data_dir)
    names = read_class_file(data_dir / CLASSES_FILE)
    max_pixels = os.environ.get(MAX_PIXELS_ENV_VAR) or model_config.get("max_pixels")
    settings, saved_precision = read_preprocessing_file(data_dir / PREPROCESSING_FILE, max_pixels)

    _register_custom_layers()
    model_path = data_dir / MODEL_FILE
    try:
        model = keras.saving.load_model(str(model_path), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a damaged or foreign file
        raise ModelFileError(
            f"{model_path}: cannot load the network ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    check_network_agrees(model, model_path, data_dir / CLASSES_FILE, data_dir / PREPROCESSING_FILE, names, settings)
    requested = model_config.get("inference_precision", saved_precision)
    from carclf_flavor import int8_runtime

    int8_report = int8_runtime.read_int8_report(data_dir)
    int8_available, int8_missing = int8_runtime.int8_network_available(data_dir, int8_report)
    precision, reason = choose_inference_precision(
        requested, int8_available=int8_available, int8_missing_reason=int8_missing
    )
    int8_network = None
    if precision == "bfloat16":
        model = _to_bfloat16(model)
    elif precision == "int8":
        int8_network = int8_runtime.load_int8_network(data_dir)
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
    PROCESS_DECODING.set_capacity(limits.max_decoding_pixels)
    _logger.info("carclf requests default to errors=%s: %s", limits.default_errors, limits.errors_reason)
    return _CarClassifierPyfunc(classifier, limits)
