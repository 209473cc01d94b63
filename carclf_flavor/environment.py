"""The environment a served carclf model needs: pinned pip requirements and the conda environment built from them."""

from __future__ import annotations

# Packages the served model imports (directly or through MLflow's scoring server).
_SERVING_PACKAGES = ("mlflow", "tensorflow-cpu", "keras", "opencv-python-headless", "pillow", "numpy", "pandas")


def get_default_pip_requirements() -> list[str]:
    """Pinned requirements (versions of this environment) a served carclf model needs; no repo install."""
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    return [_get_pinned_requirement(package) for package in _SERVING_PACKAGES]


def get_default_conda_env() -> dict:
    from mlflow.utils.environment import _mlflow_conda_env

    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())
