"""``save_model`` / ``log_model``: a Keras classifier, its class names and preprocessing as a carclf MLflow model.

The files written are described in ``carclf_flavor.layout``. The package itself is copied into the model
(``code/carclf_flavor``), so a saved model loads with only its ``requirements.txt`` installed. The last file
written is the manifest (``carclf_flavor.manifest``); with a signing key the folder is then signed
(``carclf_flavor.signing``).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from carclf_flavor.budget import DEFAULT_MAX_DECODING_PIXELS, DEFAULT_MAX_REQUEST_PIXELS
from carclf_flavor.environment import get_default_pip_requirements
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.layout import CLASSES_FILE, DATA_SUBPATH, FLAVOR_NAME, MODEL_FILE, PREPROCESSING_FILE
from carclf_flavor.manifest import write_manifest
from carclf_flavor.precision import validate_precision
from carclf_flavor.pyfunc import AUTO_ERROR_MODE, DEFAULT_MAX_IMAGES_PER_REQUEST, DEFAULT_MAX_REQUEST_BYTES
from carclf_flavor.signature import _normalise_input_example, default_signature
from carclf_flavor.signing import sign_model, signing_key_from
from carclf_flavor.version import __version__

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


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


def _settings_from(preprocessing, image_size: int | None) -> PreprocessSettings:
    if preprocessing is None:
        return PreprocessSettings(image_size=image_size or 224)
    if isinstance(preprocessing, PreprocessSettings):
        return preprocessing
    if isinstance(preprocessing, dict):
        return PreprocessSettings.from_dict(preprocessing)
    raise TypeError(f"preprocessing must be a PreprocessSettings or a dict, got {type(preprocessing).__name__}")


def _model_io_shape(model) -> tuple[int | None, int]:
    input_shape = tuple(model.inputs[0].shape)
    output_shape = tuple(model.outputs[0].shape)
    image_size = input_shape[1] if len(input_shape) == 4 else None
    return image_size, int(output_shape[-1])


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
    signing_key=None,
):
    """Save a Keras classifier (uint8 (S, S, 3) RGB in, class probabilities out) as a carclf MLflow model.

    ``class_names``: list of names (index = class id) or a path to a ``cars_meta.mat``.
    ``preprocessing``: the ``PreprocessSettings`` (or its dict) the training HDF5 was built with.
    ``fuse``: save ``carclf_flavor.resnet.fuse_for_inference(model)`` (BN and Scale folded into the convs).
    ``inference_precision``: "auto" (int8 where the CPU has VNNI and the model an int8 network, else bfloat16
    where the serving hardware computes it natively, else float32), "float32", "bfloat16" or "int8"; the
    environment variable CARCLF_INFERENCE_PRECISION overrides it at serve time.
    ``calibration_data`` (uint8 (N, S, S, 3) images): also quantize the network to int8
    (OpenVINO + NNCF). ``validation_data`` ((images, labels) arrays): int8 ships only if its top-1
    agrees with float32 on >= 99% of it and drops <= 0.5 points; without it int8 ships unvalidated, with a
    warning. The outcome is in ``data/int8.json`` and the MLmodel metadata (``carclf_int8``).
    ``signature`` defaults to ``default_signature()`` (pass False for none); ``input_example`` defaults to a
    small JPEG (bytes, an image path or a DataFrame with an ``image`` column are accepted).
    ``signing_key``: path of an elliptic-curve private key PEM (default: $CARCLF_SIGNING_KEY; none: unsigned);
    the folder is signed with OpenSSF model-signing into ``carclf-model.sig``. Every model gets the manifest.
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
    signing_key = signing_key_from(signing_key)  # a missing key file fails before anything is written
    image_size, num_outputs = _model_io_shape(model)
    if num_outputs != len(names):
        raise ValueError(f"the model has {num_outputs} outputs but {len(names)} class names were given")
    settings = _settings_from(preprocessing, image_size)
    if image_size is not None and int(settings.image_size) != int(image_size):
        raise ValueError(
            f"preprocessing.image_size={settings.image_size} but the model takes {image_size}x{image_size} images"
        )

    path = os.path.abspath(os.fspath(path))
    int8_inputs = None
    if calibration_data is not None or validation_data is not None:  # checked before writing anything
        from carclf_flavor.int8_build import prepare_int8_inputs

        int8_inputs = prepare_int8_inputs(calibration_data, validation_data, int(settings.image_size))

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
        from carclf_flavor.int8_build import build_int8_network

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
        # time; the environment variables (CARCLF_INFERENCE_PRECISION, CARCLF_MAX_PIXELS,
        # CARCLF_MAX_IMAGES_PER_REQUEST, CARCLF_MAX_REQUEST_BYTES, CARCLF_MAX_REQUEST_PIXELS,
        # CARCLF_MAX_DECODING_PIXELS, CARCLF_ERRORS) still win.
        model_config={
            "inference_precision": inference_precision,
            "max_pixels": int(settings.max_pixels),
            "max_images_per_request": DEFAULT_MAX_IMAGES_PER_REQUEST,
            "max_request_bytes": DEFAULT_MAX_REQUEST_BYTES,
            "max_request_pixels": DEFAULT_MAX_REQUEST_PIXELS,
            "max_decoding_pixels": DEFAULT_MAX_DECODING_PIXELS,
            # auto: coerce under Azure's inference server, raise elsewhere (carclf_flavor.pyfunc); an explicit
            # value here, as models saved with "raise" carry, still wins everywhere.
            "errors": AUTO_ERROR_MODE,
        },
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
    write_manifest(path)  # last: it covers every file above
    if signing_key is not None:
        sign_model(path, signing_key)
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
    signing_key=None,
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
    from mlflow.models import Model
    from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS

    import carclf_flavor  # the flavor MLflow calls back (its save_model) and names the logged model after

    info = Model.log(
        name=name,
        artifact_path=None,
        flavor=carclf_flavor,
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
        signing_key=signing_key,
        registered_model_name=registered_model_name,
        await_registration_for=DEFAULT_AWAIT_MAX_SLEEP_SECONDS
        if await_registration_for is None
        else await_registration_for,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        **kwargs,
    )
    if calibration_data is not None:
        from carclf_flavor.int8_build import log_report_to_active_run

        log_report_to_active_run((info.metadata or {}).get("carclf_int8"))
    return info
