"""Shared pieces of the flavor/serving/precision tests: a tiny real ResNet and real encoded images."""

from __future__ import annotations

import io
import pathlib

import cv2
import numpy as np
from PIL import Image

IMAGE_SIZE = 32
CLASS_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012", "BMW M3 Coupe 2012"]


def build_tiny_resnet(seed: int = 0, num_classes: int = len(CLASS_NAMES)):
    """The project's real ResNet-18 at 32 px and small width, with non-trivial BN statistics so fusion matters."""
    import keras

    from carclf_flavor.resnet import build_resnet

    keras.utils.set_random_seed(seed)
    model = build_resnet(depth=18, num_classes=num_classes, image_size=IMAGE_SIZE, width=0.25)
    rng = np.random.default_rng(seed)
    from carclf_flavor.layers import Scale

    for layer in model.layers:
        if isinstance(layer, Scale):
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, layer.gamma.shape).astype("float32"),
                    rng.normal(0.0, 0.1, layer.beta.shape).astype("float32"),
                ]
            )
        elif isinstance(layer, keras.layers.BatchNormalization):
            weights = layer.get_weights()
            # BN here may carry only moving mean/variance (Caffe style) or also gamma/beta.
            weights[-2] = rng.normal(0.0, 0.2, weights[-2].shape).astype("float32")
            weights[-1] = rng.uniform(0.5, 2.0, weights[-1].shape).astype("float32")
            layer.set_weights(weights)
    # Random deep nets saturate the softmax (one-hot outputs compare trivially): rescale the head so the
    # logits spread with a standard deviation of ~1.5 on image-like input.
    features = keras.Model(model.inputs, model.get_layer("avg_pool").output)
    sample = rng.integers(0, 256, (16, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("uint8")
    head = model.layers[-1]
    kernel, bias = head.get_weights()
    logits = np.asarray(features([sample])) @ kernel
    head.set_weights([kernel * (1.5 / (logits.std() + 1e-12)), np.zeros_like(bias)])
    return model


def jpeg_bytes(width: int = 80, height: int = 60, seed: int = 0, quality: int = 90) -> bytes:
    """A real JPEG with structure (gradients + random blocks), so crops and resizes change the pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack(
        [(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) * 3) % 256], axis=-1
    ).astype(np.uint8)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        image[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(0, 255, 3)
    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


def _rgb(width=64, height=48, seed=1) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg_bytes(width, height, seed), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def varied_format_images() -> dict[str, bytes]:
    """Grayscale/CMYK JPEG, RGBA/palette/16-bit PNG, WebP and an EXIF-rotated JPEG: all valid inputs."""
    rgb = _rgb()
    out = {}
    for name, mode, fmt, kwargs in [
        ("gray.jpg", "L", "JPEG", {}),
        ("cmyk.jpg", "CMYK", "JPEG", {}),
        ("rgba.png", "RGBA", "PNG", {}),
        ("palette.png", "P", "PNG", {}),
        ("photo.webp", "RGB", "WEBP", {}),
    ]:
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buffer, fmt, **kwargs)
        out[name] = buffer.getvalue()
    sixteen = (rgb.astype(np.uint16) * 257)[:, :, ::-1]
    out["deep16.png"] = cv2.imencode(".png", sixteen)[1].tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", exif=exif)
    out["exif_rotated.jpg"] = buffer.getvalue()
    return out


def write_cars_meta(path: pathlib.Path, names) -> pathlib.Path:
    """A devkit/cars_meta.mat as Stanford Cars ships it: a 1xN cell array `class_names`."""
    import scipy.io

    cell = np.empty((1, len(names)), dtype=object)
    for i, name in enumerate(names):
        cell[0, i] = np.array([name])
    scipy.io.savemat(str(path), {"class_names": cell})
    return path


# The one virtualenv of this test session built by fresh_venv_python: its python, environment and what it holds.
_session_venv: dict = {}


def _wanted_packages(requirements: pathlib.Path, extra_packages) -> frozenset[str]:
    lines = (line.strip() for line in requirements.read_text().splitlines())
    return frozenset({line for line in lines if line and not line.startswith("#")} | set(extra_packages))


def fresh_venv_python(tmp_path: pathlib.Path, requirements: pathlib.Path, extra_packages=()):
    """A new virtualenv with only ``requirements`` (and ``extra_packages``) installed, nothing of this checkout.

    Returns (its python, an environment without this checkout on PYTHONPATH). The session's virtualenv is
    reused when everything it holds is among what is asked for now (a float model's requirements, then an int8
    model's, which add openvino, then those plus Azure's server: conftest orders the modules so): the rest is
    installed into it, and it then holds exactly what a fresh one would, without reinstalling TensorFlow.
    """
    import os
    import subprocess
    import sys

    wanted = _wanted_packages(requirements, extra_packages)
    if _session_venv and _session_venv["installed"] <= wanted:
        python, env = _session_venv["python"], _session_venv["env"]
    else:
        venv = tmp_path / "venv"
        base_python = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=120)
        python = venv / "bin" / "python"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(requirements),
            *extra_packages,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    _session_venv.update(python=python, env=env, installed=wanted)
    return python, env


def unity_catalog_signature_check(model_uri: str, store_uri: str | None = None) -> None:
    """MLflow's Unity Catalog store's own pre-upload check on a downloaded copy of the model (raises
    MlflowException); ``store_uri``: the tracking and registry store holding it, if not the current one."""
    import mlflow
    from mlflow.store._unity_catalog.registry.rest_store import UcModelRegistryStore

    saved = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    if store_uri:
        mlflow.set_tracking_uri(store_uri)
        mlflow.set_registry_uri(store_uri)
    try:
        local_path = mlflow.artifacts.download_artifacts(model_uri)
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
    # The check reads only the MLmodel file; the store's constructor would need Databricks credentials.
    UcModelRegistryStore._validate_model_signature(object.__new__(UcModelRegistryStore), local_path)
