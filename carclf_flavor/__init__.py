"""The ``carclf`` MLflow flavor: a car classifier that takes photos (encoded bytes) and returns car models.

Public API (in the style of ``mlflow.keras``: this file only re-exports):
- ``FLAVOR_NAME`` ("carclf") and the saved layout: ``carclf_flavor.layout``.
- ``get_default_pip_requirements()``, ``get_default_conda_env()``: ``carclf_flavor.environment``.
- ``save_model(model, path, class_names, *, preprocessing=None, ..., fuse=True, inference_precision="auto")``,
  ``log_model(model, name, class_names, ..., registered_model_name=None)``: ``carclf_flavor.save``.
- ``load_model(model_uri) -> CarClassifier``; ``_load_pyfunc(path, model_config=None)`` for ``mlflow.pyfunc``
  (saved models name this package as their ``loader_module``): ``carclf_flavor.load``.
- ``CarClassifier``: Keras model + class names + ``PreprocessSettings``; ``predict(images, top_k=5, bboxes=None)``,
  ``classify_pixels(pixels, top_k)``: ``carclf_flavor.classifier``.
- The pyfunc wrapper, request parsing and ``RequestLimits``: ``carclf_flavor.pyfunc``.
- ``InvalidInputError``: the ``MlflowException`` (INVALID_PARAMETER_VALUE, HTTP 400) raised for bad requests,
  built on first access (PEP 562) so that importing this package does not import MLflow, and
  ``InternalModelError`` (INTERNAL_ERROR, HTTP 500: an unexpected failure in predict, one line);
  ``ModelFileError``: a model file refused at load: ``carclf_flavor.errors``.
- The pixel budgets per request and per process: ``carclf_flavor.budget``.
- ``input_schema()``, ``params_schema()``, ``default_signature()`` and the request columns:
  ``carclf_flavor.signature``.
- The network: ``carclf_flavor.resnet`` (architecture, fusion), ``carclf_flavor.pretrained`` (ImageNet weight
  import), ``carclf_flavor.layers``; photo preparation shared with training: ``carclf_flavor.images``.

Heavy imports (TensorFlow, Keras, MLflow) happen inside functions so that ``import carclf_flavor.images`` stays
light in Spark workers. The package never imports Spark or the pipeline (``entry_points``): it ships inside every
saved model (``code/carclf_flavor``).
"""

from __future__ import annotations

from carclf_flavor import errors as _errors
from carclf_flavor.classifier import INFERENCE_CHUNK, CarClassifier
from carclf_flavor.environment import get_default_conda_env, get_default_pip_requirements
from carclf_flavor.errors import ModelFileError, first_problem_message
from carclf_flavor.images import ImageDecodeError, PreprocessSettings
from carclf_flavor.layout import CLASSES_FILE, DATA_SUBPATH, FLAVOR_NAME, MODEL_FILE, PREPROCESSING_FILE
from carclf_flavor.load import MAX_PIXELS_ENV_VAR, _load_from_data_dir, _load_pyfunc, load_model
from carclf_flavor.precision import ENV_VAR as PRECISION_ENV_VAR
from carclf_flavor.pyfunc import (
    ACCEPTED_SHAPES,
    DEFAULT_MAX_IMAGES_PER_REQUEST,
    DEFAULT_MAX_REQUEST_BYTES,
    ERRORS_ENV_VAR,
    MAX_IMAGES_ENV_VAR,
    MAX_REQUEST_BYTES_ENV_VAR,
    RequestLimits,
    decode_base64_image,
)
from carclf_flavor.save import log_model, read_class_names, save_model
from carclf_flavor.signature import (
    AUTO_ERROR_MODE,
    BBOX_COLUMNS,
    DEFAULT_TOP_K,
    ERROR_COLUMN,
    ERROR_MODES,
    IMAGE_COLUMN,
    OUTPUT_COLUMNS,
    default_signature,
    input_schema,
    params_schema,
)
from carclf_flavor.version import __version__


def __getattr__(name):  # PEP 562: `carclf_flavor.InvalidInputError` without importing MLflow up front
    if name in ("InvalidInputError", "InternalModelError"):
        return getattr(_errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACCEPTED_SHAPES",
    "AUTO_ERROR_MODE",
    "BBOX_COLUMNS",
    "CLASSES_FILE",
    "DATA_SUBPATH",
    "DEFAULT_MAX_IMAGES_PER_REQUEST",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_TOP_K",
    "ERRORS_ENV_VAR",
    "ERROR_COLUMN",
    "ERROR_MODES",
    "FLAVOR_NAME",
    "IMAGE_COLUMN",
    "INFERENCE_CHUNK",
    "MAX_IMAGES_ENV_VAR",
    "MAX_PIXELS_ENV_VAR",
    "MAX_REQUEST_BYTES_ENV_VAR",
    "MODEL_FILE",
    "OUTPUT_COLUMNS",
    "PRECISION_ENV_VAR",
    "PREPROCESSING_FILE",
    "CarClassifier",
    "ImageDecodeError",
    "InternalModelError",
    "InvalidInputError",
    "ModelFileError",
    "PreprocessSettings",
    "RequestLimits",
    "__version__",
    "_load_from_data_dir",
    "_load_pyfunc",
    "decode_base64_image",
    "default_signature",
    "first_problem_message",
    "get_default_conda_env",
    "get_default_pip_requirements",
    "input_schema",
    "load_model",
    "log_model",
    "params_schema",
    "read_class_names",
    "save_model",
]
