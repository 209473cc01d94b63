"""The environment a served carclf model needs: pinned pip requirements and the conda environment built from them."""

from __future__ import annotations

# Packages the served model imports (directly or through MLflow's scoring server), pinned to this environment's
# versions. TensorFlow is pinned separately (below).
_SERVING_PACKAGES = ("mlflow", "keras", "opencv-python-headless", "pillow", "numpy", "pandas", "pybase64")
# Served models run on CPU endpoints (Azure managed online endpoints, `mlflow models serve`), so they ask for
# `tensorflow-cpu`: the same TensorFlow without the CUDA libraries, about half the install and image size. It is
# pinned to the TensorFlow version that trained the model, whichever distribution provided it here (`tensorflow`
# on GPU machines and Databricks, `tensorflow-cpu` elsewhere): both ship the same `tensorflow` module.
_SERVING_TENSORFLOW = "tensorflow-cpu"


def get_default_pip_requirements(int8_network: bool = False) -> list[str]:
    """Pinned requirements (versions of this environment) a served carclf model needs; no repo install.

    ``int8_network``: the model ships an int8 network, which needs the OpenVINO runtime (NNCF is save-time only).
    """
    import tensorflow as tf
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    packages = _SERVING_PACKAGES + (("openvino",) if int8_network else ())
    requirements = [_get_pinned_requirement(package) for package in packages]
    requirements.insert(1, f"{_SERVING_TENSORFLOW}=={tf.__version__}")
    return requirements


def get_default_conda_env() -> dict:
    from mlflow.utils.environment import _mlflow_conda_env

    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())
