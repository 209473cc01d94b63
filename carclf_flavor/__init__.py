"""The ``carclf`` MLflow flavor: a car classifier that takes photos (encoded bytes) and returns car models.

Public API (in the style of ``mlflow.sklearn``):
- ``FLAVOR_NAME`` ("carclf").
- ``get_default_pip_requirements()``, ``get_default_conda_env()``: the pinned packages a served model needs.
- ``save_model(model, path, class_names, *, preprocessing=None, ..., fuse=True, inference_precision="auto")``.
- ``log_model(model, name, class_names, ..., registered_model_name=None)`` (through ``mlflow.models.Model.log``).
- ``load_model(model_uri) -> CarClassifier``; ``_load_pyfunc(path, model_config=None)`` for ``mlflow.pyfunc``.
- ``CarClassifier``: Keras model + class names + ``PreprocessSettings``; ``predict(images, top_k=5, bboxes=None)``.
- ``InvalidInputError``: the ``MlflowException`` (INVALID_PARAMETER_VALUE, HTTP 400) raised for bad requests.
- ``input_schema()``, ``output_schema()``, ``params_schema()``, ``default_signature()``: the logged signature.

Saved layout::

    MLmodel                      carclf + python_function flavors, signature, input example
    data/model.keras             the fused float32 inference network (Keras 3 format, loads with safe_mode=True)
    data/classes.json            class index -> name, as a JSON list
    data/preprocessing.json      PreprocessSettings (as the HDF5 data was built) + inference_precision
    data/int8.json               only with calibration data: the int8 validation report (carclf_flavor.int8)
    data/model_int8.xml, .bin    only when int8 passed validation: the int8 network (OpenVINO IR)
    code/carclf_flavor/          this package: the model loads with only requirements.txt installed
    requirements.txt, conda.yaml, python_env.yaml, serving_input_example.json, input_example.json

Nothing is unpickled at load time: the network is a ``.keras`` file loaded with ``safe_mode=True`` and every
other piece is JSON. Heavy imports (TensorFlow, Keras, MLflow) happen inside functions so that
``import carclf_flavor.images`` stays light in Spark workers.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import numbers
import os
import pathlib
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import numpy as np

from carclf_flavor.images import (
    ImageDecodeError,
    PreprocessSettings,
    clamp_bbox,
    crop_and_resize,
    image_size_of,
    preprocess_image,
)
from carclf_flavor.precision import ENV_VAR as PRECISION_ENV_VAR  # noqa: F401  (re-exported)
from carclf_flavor.precision import choose_inference_precision, validate_precision
from carclf_flavor.version import __version__

FLAVOR_NAME = "carclf"
DATA_SUBPATH = "data"
MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"
PREPROCESSING_FILE = "preprocessing.json"
IMAGE_COLUMN = "image"
BBOX_COLUMNS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
ERROR_COLUMN = "error"
OUTPUT_COLUMNS = ("label", "class_id", "prob", "top_k")
ERROR_MODES = ("raise", "coerce")
DEFAULT_TOP_K = 5
# Serve-time override of the pixel limit (decompression-bomb guard) saved in preprocessing.json.
MAX_PIXELS_ENV_VAR = "CARCLF_MAX_PIXELS"
# Packages the served model imports (directly or through MLflow's scoring server).
_SERVING_PACKAGES = ("mlflow", "tensorflow-cpu", "keras", "opencv-python-headless", "pillow", "numpy", "pandas")
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent

# A child of MLflow's logger: `mlflow models serve` shows its INFO lines, so the precision choice is visible.
_logger = logging.getLogger("mlflow.carclf")


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
_invalid_input_class = None


def _invalid_input_error_class():
    """Build the MlflowException subclass on first use (importing MLflow costs ~2 s; images.py users skip it)."""
    global _invalid_input_class
    if _invalid_input_class is None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        class InvalidInputError(MlflowException):
            """A bad request (image, bbox or parameter): HTTP 400 with a one-line message, no stack trace.

            MLflow's scoring server rewrites ``e.message`` to "Failed to predict data '<repr of the whole
            input DataFrame>'. Error: ..." before answering; that repr holds raw image bytes and spans many
            lines, so the message set at construction is kept.
            """

            def __init__(self, message: str):
                super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
                self.__dict__["_frozen_message"] = str(message)

            @property
            def message(self):
                return self.__dict__.get("_frozen_message", self.__dict__.get("_message"))

            @message.setter
            def message(self, value):
                if "_frozen_message" not in self.__dict__:
                    self.__dict__["_message"] = value

        InvalidInputError.__module__ = __name__
        InvalidInputError.__qualname__ = "InvalidInputError"
        _invalid_input_class = InvalidInputError
    return _invalid_input_class


def __getattr__(name):  # PEP 562: `carclf_flavor.InvalidInputError` without importing MLflow up front
    if name == "InvalidInputError":
        return _invalid_input_error_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _invalid(message: str):
    return _invalid_input_error_class()(message)


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------
def get_default_pip_requirements(int8_network: bool = False) -> list[str]:
    """Pinned requirements (versions of this environment) a served carclf model needs; no repo install.

    ``int8_network``: the model ships an int8 network, which needs the OpenVINO runtime (NNCF is save-time only).
    """
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    packages = _SERVING_PACKAGES + (("openvino",) if int8_network else ())
    return [_get_pinned_requirement(package) for package in packages]


def get_default_conda_env() -> dict:
    from mlflow.utils.environment import _mlflow_conda_env

    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


# --------------------------------------------------------------------------------------------------
# Signature
# --------------------------------------------------------------------------------------------------
def input_schema():
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    # `binary`: REST clients send base64 strings and MLflow's server decodes them; raw bytes work in-process.
    # The optional bbox columns hold integer pixel coordinates, checked by predict (naming the row). They are
    # declared `Any` because MLflow's own typing gets them wrong either way: as `long` the server casts 1.5 to
    # 1 silently and refuses a batch where some rows have no bbox (null); as `double` every in-process caller
    # with an int64 column is refused ("Can not safely convert int64 to float64").
    return Schema(
        [ColSpec("binary", IMAGE_COLUMN)] + [ColSpec(AnyType(), name, required=False) for name in BBOX_COLUMNS]
    )


def output_schema():
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    return Schema([
        ColSpec("string", "label"),
        ColSpec("long", "class_id"),
        ColSpec("double", "prob"),
        ColSpec(Array(Object([Property("label", "string"), Property("prob", "double")])), "top_k"),
    ])


def params_schema():
    from mlflow.types import ParamSchema, ParamSpec

    return ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K), ParamSpec("errors", "string", "raise")])


def default_signature():
    from mlflow.models import ModelSignature

    return ModelSignature(inputs=input_schema(), outputs=output_schema(), params=params_schema())


def _default_input_example_image() -> bytes:
    """A small real JPEG (a car-coloured gradient) for the logged input example."""
    import cv2

    height, width = 48, 64
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 4) % 256, (y * 5) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def _normalise_input_example(input_example):
    import pandas as pd

    if input_example is None:
        input_example = _default_input_example_image()
    if isinstance(input_example, (bytes, bytearray)):
        return pd.DataFrame({IMAGE_COLUMN: [bytes(input_example)]})
    if isinstance(input_example, (str, os.PathLike)) and pathlib.Path(input_example).is_file():
        return pd.DataFrame({IMAGE_COLUMN: [pathlib.Path(input_example).read_bytes()]})
    return input_example


# --------------------------------------------------------------------------------------------------
# Class names and metadata
# --------------------------------------------------------------------------------------------------
def read_class_names(class_names) -> list[str]:
    """A list of names, or a path to Stanford Cars' ``cars_meta.mat`` (``class_names`` cell array)."""
    if isinstance(class_names, (str, os.PathLike)):
        path = pathlib.Path(class_names)
        if not path.is_file():
            raise ValueError(f"class_names: {path} is not a file (expected a list of names or a cars_meta.mat)")
        if path.suffix.lower() == ".json":
            names = json.loads(path.read_text())
        else:
            import scipy.io

            try:
                meta = scipy.io.loadmat(str(path), squeeze_me=True)
            except Exception as exc:
                raise ValueError(f"class_names: cannot read {path} as a .mat file ({exc})") from None
            if "class_names" not in meta:
                raise ValueError(f"class_names: {path} has no 'class_names' variable (keys: {sorted(meta)})")
            names = [str(np.asarray(name).squeeze()) for name in np.atleast_1d(meta["class_names"])]
    else:
        names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names is empty")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"class_names has duplicates: {duplicates[:5]}")
    return names


def _settings_from(preprocessing, image_size: Optional[int]) -> PreprocessSettings:
    if preprocessing is None:
        return PreprocessSettings(image_size=image_size or 224)
    if isinstance(preprocessing, PreprocessSettings):
        return preprocessing
    if isinstance(preprocessing, dict):
        return PreprocessSettings.from_dict(preprocessing)
    raise TypeError(f"preprocessing must be a PreprocessSettings or a dict, got {type(preprocessing).__name__}")


def _model_io_shape(model) -> tuple[Optional[int], int]:
    input_shape = tuple(model.inputs[0].shape)
    output_shape = tuple(model.outputs[0].shape)
    image_size = input_shape[1] if len(input_shape) == 4 else None
    return image_size, int(output_shape[-1])


# --------------------------------------------------------------------------------------------------
# save / log
# --------------------------------------------------------------------------------------------------
def save_model(
    model,
    path,
    class_names,
    *,
    preprocessing=None,
    mlflow_model=None,
    signature=None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    conda_env=None,
    code_paths=None,
    metadata=None,
    fuse: bool = True,
    inference_precision: str = "auto",
    calibration_data=None,
    validation_data=None,
):
    """Save a Keras classifier (uint8 (S, S, 3) RGB in, class probabilities out) as a carclf MLflow model.

    ``class_names``: list of names (index = class id) or a path to a ``cars_meta.mat``.
    ``preprocessing``: the ``PreprocessSettings`` (or its dict) the training HDF5 was built with.
    ``fuse``: save ``carclf_flavor.resnet.fuse_for_inference(model)`` (BN and Scale folded into the convs).
    ``inference_precision``: "auto" (int8 where the CPU has VNNI and the model an int8 network, else bfloat16
    where the serving hardware computes it natively, else float32), "float32", "bfloat16" or "int8"; the
    environment variable CARCLF_INFERENCE_PRECISION overrides it at serve time.
    ``calibration_data`` (uint8 (N, S, S, 3) images or an HDF5 split): also quantize the network to int8
    (OpenVINO + NNCF). ``validation_data`` ((images, labels) or an HDF5 split): int8 ships only if its top-1
    agrees with float32 on >= 99% of it and drops <= 0.5 points; without it int8 ships unvalidated, with a
    warning. The outcome is in ``data/int8.json`` and the MLmodel metadata (``carclf_int8``).
    ``signature`` defaults to ``default_signature()`` (pass False for none); ``input_example`` defaults to a
    small JPEG (bytes, an image path or a DataFrame with an ``image`` column are accepted).
    """
    import yaml
    from mlflow import pyfunc
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import _save_example
    from mlflow.utils.environment import (
        _CONDA_ENV_FILE_NAME,
        _CONSTRAINTS_FILE_NAME,
        _PYTHON_ENV_FILE_NAME,
        _REQUIREMENTS_FILE_NAME,
        _process_conda_env,
        _process_pip_requirements,
        _PythonEnv,
        _validate_env_arguments,
    )
    from mlflow.utils.file_utils import get_total_file_size, write_to
    from mlflow.utils.model_utils import _validate_and_copy_code_paths, _validate_and_prepare_target_save_path

    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    inference_precision = validate_precision(inference_precision)
    if inference_precision == "int8" and calibration_data is None:
        raise ValueError("inference_precision='int8' needs calibration_data (images to quantize the network with)")
    names = read_class_names(class_names)
    image_size, num_outputs = _model_io_shape(model)
    if num_outputs != len(names):
        raise ValueError(f"the model has {num_outputs} outputs but {len(names)} class names were given")
    settings = _settings_from(preprocessing, image_size)
    if image_size is not None and int(settings.image_size) != int(image_size):
        raise ValueError(
            f"preprocessing.image_size={settings.image_size} but the model takes {image_size}x{image_size} images"
        )

    int8_inputs = None
    if calibration_data is not None or validation_data is not None:  # read (and checked) before writing anything
        from carclf_flavor.int8 import read_int8_inputs

        int8_inputs = read_int8_inputs(calibration_data, validation_data, int(settings.image_size))

    path = os.path.abspath(os.fspath(path))
    _validate_and_prepare_target_save_path(path)

    if fuse:
        from carclf_flavor.resnet import fuse_for_inference

        model = fuse_for_inference(model, dtype="float32")

    data_dir = os.path.join(path, DATA_SUBPATH)
    os.makedirs(data_dir)
    model.save(os.path.join(data_dir, MODEL_FILE))
    with open(os.path.join(data_dir, CLASSES_FILE), "w", encoding="utf-8") as handle:
        json.dump(names, handle, indent=1, ensure_ascii=False)
    preprocessing_record = dict(settings.to_dict(), inference_precision=inference_precision)
    with open(os.path.join(data_dir, PREPROCESSING_FILE), "w", encoding="utf-8") as handle:
        json.dump(preprocessing_record, handle, indent=2, sort_keys=True)
    int8_report = None
    if int8_inputs is not None:
        from carclf_flavor.int8 import build_int8_network

        int8_report = build_int8_network(model, data_dir, *int8_inputs)

    # The package ships inside the model (no repo install needed to serve); __pycache__ stays behind.
    with tempfile.TemporaryDirectory() as staging:
        package_copy = os.path.join(staging, "carclf_flavor")
        shutil.copytree(_PACKAGE_DIR, package_copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        code_dir_subpath = _validate_and_copy_code_paths([package_copy] + list(code_paths or []), path)

    if mlflow_model is None:
        mlflow_model = Model()
    _save_example(mlflow_model, _normalise_input_example(input_example), path)
    if signature is None:
        signature = default_signature()
    elif signature is False:
        signature = None
    if signature is not None:
        mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata
    if int8_report is not None:
        mlflow_model.metadata = dict(mlflow_model.metadata or {}, carclf_int8=int8_report)

    pyfunc.add_to_model(
        mlflow_model,
        loader_module="carclf_flavor",
        data=DATA_SUBPATH,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        code=code_dir_subpath,
        # Declared so that `mlflow.pyfunc.load_model(uri, model_config={...})` may override them at load
        # time; the environment variables CARCLF_INFERENCE_PRECISION / CARCLF_MAX_PIXELS still win.
        model_config={"inference_precision": inference_precision, "max_pixels": int(settings.max_pixels)},
    )
    import keras

    mlflow_model.add_flavor(
        FLAVOR_NAME,
        data=DATA_SUBPATH,
        model_file=MODEL_FILE,
        classes_file=CLASSES_FILE,
        preprocessing_file=PREPROCESSING_FILE,
        num_classes=len(names),
        image_size=int(settings.image_size),
        fused=bool(fuse),
        inference_precision=inference_precision,
        keras_version=keras.__version__,
        carclf_version=__version__,
        code=code_dir_subpath,
    )
    if size := get_total_file_size(path):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))

    if conda_env is None:
        int8_shipped = bool(int8_report and int8_report["shipped"])
        default_reqs = get_default_pip_requirements(int8_shipped) if pip_requirements is None else None
        conda_env, pip_requirements, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as handle:
        yaml.safe_dump(conda_env, stream=handle, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
    return mlflow_model


def log_model(
    model,
    name,
    class_names,
    *,
    preprocessing=None,
    signature=None,
    input_example=None,
    pip_requirements=None,
    extra_pip_requirements=None,
    conda_env=None,
    code_paths=None,
    metadata=None,
    fuse: bool = True,
    inference_precision: str = "auto",
    calibration_data=None,
    validation_data=None,
    registered_model_name=None,
    await_registration_for=None,
    params=None,
    tags=None,
    model_type=None,
    step: int = 0,
    model_id=None,
    **kwargs,
):
    """Log a carclf model to the active run (see ``save_model``); returns MLflow's ``ModelInfo``.

    With calibration data, the int8 outcome (agreement, drop, shipped and why) is also logged to the run.
    """
    import sys

    from mlflow.models import Model
    from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS

    info = Model.log(
        name=name,
        artifact_path=None,
        flavor=sys.modules[__name__],
        model=model,
        class_names=class_names,
        preprocessing=preprocessing,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        conda_env=conda_env,
        code_paths=code_paths,
        metadata=metadata,
        fuse=fuse,
        inference_precision=inference_precision,
        calibration_data=calibration_data,
        validation_data=validation_data,
        registered_model_name=registered_model_name,
        await_registration_for=DEFAULT_AWAIT_MAX_SLEEP_SECONDS if await_registration_for is None else await_registration_for,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        **kwargs,
    )
    if calibration_data is not None:
        from carclf_flavor.int8 import log_report_to_active_run

        log_report_to_active_run((info.metadata or {}).get("carclf_int8"))
    return info


# --------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------
_executor_lock = threading.Lock()
_executor: Optional[ThreadPoolExecutor] = None


def _decode_pool() -> ThreadPoolExecutor:
    # OpenCV and Pillow release the GIL while decoding: a few threads decode a batch in parallel.
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="carclf-decode")
        return _executor


class CarClassifier:
    """A Keras network + class names + the preprocessing it was trained with. Thread-safe."""

    def __init__(self, model, class_names: Sequence[str], settings: PreprocessSettings,
                 precision: str = "float32", precision_reason: str = "", int8_network=None):
        import tensorflow as tf

        self.model = model
        self.class_names = list(class_names)
        self.settings = settings
        self.precision = precision
        self.precision_reason = precision_reason
        size = int(settings.image_size)
        self._num_classes = len(self.class_names)
        if int8_network is not None:  # carclf_flavor.int8.OpenVINONetwork: pixels -> probabilities
            self._forward = int8_network
            return
        # One traced graph with a fixed signature: concurrent calls never retrace (Keras' predict() is not
        # safe to call from several threads at once), and a batch is a single call.
        self._forward = tf.function(
            lambda pixels: tf.cast(model(pixels, training=False), tf.float32),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            reduce_retracing=False,
        )
        self._forward(tf.zeros([1, size, size, 3], tf.uint8))  # trace now, not inside the first request

    # -- preprocessing ------------------------------------------------------------------------------
    def _prepare_one(self, image, bbox) -> np.ndarray:
        if isinstance(image, np.ndarray) and image.dtype != np.uint8 and image.dtype != object:
            raise ImageDecodeError(f"arrays must be uint8 RGB, got dtype {image.dtype}")
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            if image.ndim != 3 or image.shape[2] != 3:
                raise ImageDecodeError(f"arrays must have shape (H, W, 3), got {image.shape}")
            height, width = image.shape[:2]
            if width * height > self.settings.max_pixels:
                raise ImageDecodeError(f"image is {width}x{height}, above the pixel limit {self.settings.max_pixels}")
            if bbox is not None:
                clamp_bbox(bbox, width, height)  # a box outside the image is an error, even when crop="none"
            return crop_and_resize(image, bbox, self.settings)
        if isinstance(image, (bytearray, memoryview)):
            image = bytes(image)
        if not isinstance(image, bytes):
            raise ImageDecodeError(f"expected encoded image bytes or a uint8 array, got {type(image).__name__}")
        if bbox is not None and len(image) > 0:
            width, height = image_size_of(image)
            clamp_bbox(bbox, width, height)
        return preprocess_image(image, bbox, self.settings)

    def preprocess(self, images: Sequence[Any], bboxes: Optional[Sequence[Any]] = None
                   ) -> tuple[np.ndarray, list[Optional[str]]]:
        """Decode/crop/resize each image (in parallel); returns (pixels of the good ones, error per input)."""
        bboxes = list(bboxes) if bboxes is not None else [None] * len(images)
        if len(bboxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(bboxes)} bboxes")

        def prepare(index):
            try:
                return self._prepare_one(images[index], bboxes[index]), None
            except (ImageDecodeError, ValueError, TypeError) as exc:
                return None, str(exc)

        if len(images) > 1:
            results = list(_decode_pool().map(prepare, range(len(images))))
        else:
            results = [prepare(i) for i in range(len(images))]
        errors = [error for _, error in results]
        size = int(self.settings.image_size)
        good = [pixels for pixels, error in results if error is None]
        batch = np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)
        return batch, errors

    # -- prediction ---------------------------------------------------------------------------------
    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, num_classes) float32 probabilities, in one network call."""
        if len(pixels) == 0:
            return np.zeros((0, self._num_classes), np.float32)
        probs = self._forward(np.ascontiguousarray(pixels, dtype=np.uint8))
        return probs if isinstance(probs, np.ndarray) else probs.numpy()

    def _rank(self, probs: np.ndarray, top_k: int) -> list[dict]:
        k = min(int(top_k), self._num_classes)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        results = []
        for row, ranked in zip(probs, order):
            best = int(ranked[0])
            results.append({
                "label": self.class_names[best],
                "class_id": best,
                "prob": float(row[best]),
                "top_k": [{"label": self.class_names[int(c)], "prob": float(row[int(c)])} for c in ranked],
            })
        return results

    def predict(self, images, top_k: int = DEFAULT_TOP_K, bboxes=None, errors: str = "raise") -> list[Optional[dict]]:
        """Classify encoded images (bytes) or uint8 RGB arrays; one dict per image.

        Each dict: ``label``, ``class_id``, ``prob``, ``top_k`` (list of {label, prob}, most likely first).
        ``bboxes``: one (x1, y1, x2, y2) or None per image, in source pixels. ``errors="raise"`` raises
        ``ImageDecodeError`` naming the first bad image; ``"coerce"`` returns None for bad images.
        """
        if isinstance(images, (bytes, bytearray)) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        images = list(images)
        if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        pixels, problems = self.preprocess(images, bboxes)
        bad = [(i, p) for i, p in enumerate(problems) if p is not None]
        if bad and errors == "raise":
            index, problem = bad[0]
            more = f" (and {len(bad) - 1} more bad images)" if len(bad) > 1 else ""
            raise ImageDecodeError(f"image {index}: {problem}{more}")
        ranked = iter(self._rank(self.predict_pixels(pixels), top_k))
        return [None if problem is not None else next(ranked) for problem in problems]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
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


def _load_from_data_dir(data_dir: str, model_config: Optional[dict] = None) -> CarClassifier:
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
    precision, reason = choose_inference_precision(requested, int8_available=int8_available,
                                                   int8_missing_reason=int8_missing)
    int8_network = None
    if precision == "bfloat16":
        model = _to_bfloat16(model)
    elif precision == "int8":
        int8_network = int8.load_int8_network(data_dir)
        validated = "validated" if int8_report.get("validated") else "NOT validated"
        reason += f" (OpenVINO, {int8_network.threads} threads; int8 {validated} when saved)"
    _logger.info("carclf model serving in %s: %s", precision, reason)
    return CarClassifier(model, names, settings, precision=precision, precision_reason=reason,
                         int8_network=int8_network)


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
    return _CarClassifierPyfunc(_load_from_data_dir(str(path), model_config))


# --------------------------------------------------------------------------------------------------
# The pyfunc (what `mlflow models serve` runs)
# --------------------------------------------------------------------------------------------------
def _is_missing(value) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    import pandas as pd

    return value is pd.NA or value is pd.NaT


def _as_int(value, column: str) -> int:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{column} must be an integer, got {value!r}")


def _image_bytes(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        # In-process callers sometimes pass the base64 text itself (the server decodes it before we see it).
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image is a string but not valid base64") from None
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value
    raise ValueError(f"image must be encoded image bytes, got {type(value).__name__}")


class _CarClassifierPyfunc:
    """pyfunc wrapper: DataFrame (image [+ bbox_x1..bbox_y2]) -> DataFrame (label, class_id, prob, top_k[, error]).

    params: ``top_k`` (default 5), ``errors`` ("raise": the first bad row fails the request with HTTP 400;
    "coerce": bad rows get label/class_id/prob null, top_k [] and an ``error`` text; good rows are scored).
    """

    def __init__(self, classifier: CarClassifier):
        self.classifier = classifier

    def get_raw_model(self):
        return self.classifier

    def _params(self, params):
        params = dict(params or {})
        top_k = params.get("top_k", DEFAULT_TOP_K)
        if isinstance(top_k, str):
            try:
                top_k = int(top_k)
            except ValueError:
                pass
        if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise _invalid(f"params.top_k must be an integer >= 1, got {top_k!r}")
        errors = str(params.get("errors", "raise")).strip().lower()
        if errors not in ERROR_MODES:
            raise _invalid(f"params.errors must be one of {', '.join(ERROR_MODES)}, got {params.get('errors')!r}")
        return int(top_k), errors

    def _rows(self, data):
        import pandas as pd

        if isinstance(data, dict):
            data = pd.DataFrame(data)
        if not isinstance(data, pd.DataFrame):
            raise _invalid(f"input must be a DataFrame with an '{IMAGE_COLUMN}' column, got {type(data).__name__}")
        if IMAGE_COLUMN not in data.columns:
            raise _invalid(f"input has no '{IMAGE_COLUMN}' column (columns: {list(map(str, data.columns))})")
        present = [c for c in BBOX_COLUMNS if c in data.columns]
        if present and len(present) != len(BBOX_COLUMNS):
            missing = [c for c in BBOX_COLUMNS if c not in data.columns]
            raise _invalid(f"bbox columns must come together: missing {', '.join(missing)}")
        images, bboxes, problems = [], [], []
        bbox_values = data[list(BBOX_COLUMNS)].to_numpy(dtype=object) if present else None
        for row, value in enumerate(data[IMAGE_COLUMN].tolist()):
            problem, image, bbox = None, None, None
            try:
                if _is_missing(value):
                    raise ValueError("image is missing (null)")
                image = _image_bytes(value)
                if bbox_values is not None:
                    values = bbox_values[row]
                    missing = [c for c, v in zip(BBOX_COLUMNS, values) if _is_missing(v)]
                    if len(missing) == len(BBOX_COLUMNS):
                        bbox = None
                    elif missing:
                        raise ValueError(f"bbox is incomplete: {', '.join(missing)} missing")
                    else:
                        bbox = tuple(_as_int(v, c) for c, v in zip(BBOX_COLUMNS, values))
            except ValueError as exc:
                problem = str(exc)
            images.append(image if problem is None else b"")
            bboxes.append(bbox)
            problems.append(problem)
        return images, bboxes, problems

    def predict(self, data, params: Optional[dict] = None):
        import pandas as pd

        top_k, errors = self._params(params)
        images, bboxes, problems = self._rows(data)
        # Rows already bad are not decoded; the rest go through the same preprocessing as the training data.
        todo = [i for i, p in enumerate(problems) if p is None]
        pixels, decode_problems = self.classifier.preprocess([images[i] for i in todo], [bboxes[i] for i in todo])
        for i, problem in zip(todo, decode_problems):
            problems[i] = problem
        bad = [(i, p) for i, p in enumerate(problems) if p is not None]
        if bad and errors == "raise":
            row, problem = bad[0]
            more = f" (and {len(bad) - 1} more bad rows; params errors=coerce scores the good ones)" if len(bad) > 1 else ""
            raise _invalid(f"row {row}: {problem}{more}")
        ranked = iter(self.classifier._rank(self.classifier.predict_pixels(pixels), top_k))
        records = []
        for problem in problems:
            if problem is None:
                record = next(ranked)
                if errors == "coerce":
                    record[ERROR_COLUMN] = None
            else:
                # top_k is an empty list, not null: spark_udf cannot convert a null array inside its struct.
                record = dict(dict.fromkeys(OUTPUT_COLUMNS), top_k=[])
                record[ERROR_COLUMN] = problem
            records.append(record)
        columns = list(OUTPUT_COLUMNS) + ([ERROR_COLUMN] if errors == "coerce" else [])
        if errors == "coerce":
            # object columns keep None (JSON null) for bad rows instead of NaN.
            return pd.DataFrame({c: pd.Series([r[c] for r in records], dtype=object) for c in columns})
        return pd.DataFrame.from_records(records, columns=columns) if records else pd.DataFrame(columns=columns)
