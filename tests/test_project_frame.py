"""The project frame: pins agree between pyproject and conda.yaml, MLproject is well formed, CI runs make test."""

import ast
import os
import pathlib
import re
import tomllib

import pytest
import yaml

from conftest import REPO_ROOT


def _normalise(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def _pyproject():
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _conda_pip_requirements():
    env = yaml.safe_load((REPO_ROOT / "conda.yaml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "conda.yaml must have exactly one pip section"
    return env, pip_sections[0]


def test_conda_and_pyproject_name_the_same_pins():
    """conda.yaml's pip section is the core plus the azure extra (what `mlflow run` with conda needs for deploy)."""
    project = _pyproject()["project"]
    runtime = {_normalise(r) for r in project["dependencies"] + project["optional-dependencies"]["azure"]}
    _, pip_reqs = _conda_pip_requirements()
    conda = {_normalise(r) for r in pip_reqs}
    assert runtime == conda, f"only in pyproject: {runtime - conda}; only in conda.yaml: {conda - runtime}"


def test_dependency_policy():
    """The core installs beside a cluster's MLflow 3.8.1-3.x without the Azure plugin; the extra pins what it accepts."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = _pyproject()["project"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    core = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    azure = {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["azure"]}
    assert not any(name.startswith("azureml") or name.startswith("azure-") for name in core)
    # Databricks Runtime 18 LTS ML ships MLflow 3.8.1, 19 ML 3.12.0; any newer 3.x must not be replaced either.
    for version in ("3.8.1", "3.12.0", "3.15.0", "3.17.2", "3.18.0", "3.99.0"):
        assert core["mlflow"].specifier.contains(version), f"the core must install beside MLflow {version}"
    for version in ("3.8.0", "2.22.0", "4.0.0"):
        assert not core["mlflow"].specifier.contains(version), f"the core must not claim MLflow {version}"
    # CI's second venvs test exactly the two ends of that range.
    floor = re.search(r"^MLFLOW_FLOOR\s*\?=\s*(\S+)", makefile, re.M).group(1)
    latest = re.search(r"^MLFLOW_LATEST\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert floor == "3.8.1" and core["mlflow"].specifier.contains(latest) and Version(latest) > Version(floor)
    # azureml-mlflow 1.62 requires mlflow-skinny<=3.15.0: the extra names the one MLflow it accepts.
    assert ">=1.62" in str(azure["azureml-mlflow"].specifier) and "deployments" in azure["azureml-mlflow"].extras
    assert str(azure["mlflow"].specifier) == "==3.15.0"
    pandas = core["pandas"]
    assert not pandas.specifier.contains("3.0.0"), "pyspark.pandas does not import with pandas 3"
    assert "opencv-python-headless" in core and "opencv-python" not in core
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "-e '.[test,azure]'" in makefile and "make test-mlflow-floor" in ci and "make test-mlflow-latest" in ci


@pytest.mark.skipif(
    not os.environ.get("CARCLF_EXPECT_MLFLOW"),
    reason="runs in the second venvs (make test-mlflow-floor, make test-mlflow-latest)",
)
def test_second_venv_has_the_expected_mlflow_and_no_azure_plugin():
    import importlib.util

    import mlflow

    assert mlflow.__version__ == os.environ["CARCLF_EXPECT_MLFLOW"]
    assert importlib.util.find_spec("azureml") is None


def test_tune_names_the_mlflow_it_needs_below_the_core_floor():
    """tune alone needs MLflow 3.15 (a maximizing MlflowSparkStudy); on an older MLflow it says so in one line."""
    import inspect

    from mlflow.pyspark.optuna.study import MlflowSparkStudy

    from carclf.tuning.spark_study import TuneError, require_maximizing_study

    if "direction" in inspect.signature(MlflowSparkStudy.__init__).parameters:
        require_maximizing_study(MlflowSparkStudy)
    else:
        with pytest.raises(TuneError, match=r"^tune needs MLflow >= 3\.15\.0 .*this is MLflow 3\.[0-9]+\.[0-9]+: pip"):
            require_maximizing_study(MlflowSparkStudy)


def test_conda_env_python_matches_supported_range():
    env, _ = _conda_pip_requirements()
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python == "python=3.11"


def test_mlproject_declares_conda_env_and_entry_points():
    project = yaml.safe_load((REPO_ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    entry_points = project["entry_points"]
    assert {"main", "preprocess"} <= set(entry_points)
    for name, spec in entry_points.items():
        command = spec["command"]
        for param in spec.get("parameters", {}):
            assert "{" + param + "}" in command, f"entry point {name}: parameter {param} is never passed on"
        module = re.search(r"python -m (entry_points\.\w+)", command)
        assert module, f"entry point {name} must run a module of entry_points/"
        assert (REPO_ROOT / (module.group(1).replace(".", "/") + ".py")).exists(), f"{name}: missing {module.group(1)}"


def test_ci_runs_the_readme_test_command_and_keeps_pytest_exit_code():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make run" in readme
    assert "set -euo pipefail" in ci and "|| true" not in ci
    makefile = (REPO_ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:")[1].split("\n\n")[0]
    assert "pytest" in test_recipe and "||" not in test_recipe and "; true" not in test_recipe


def test_generated_files_are_ignored():
    ignored = (REPO_ROOT / ".gitignore").read_text().split()
    for pattern in (
        "/data/",
        "mlruns/",
        "mlflow.db",
        "*.h5",
        "*.keras",
        ".venv",
        ".venv-mlflow-floor/",
        ".venv-mlflow-latest/",
    ):
        assert pattern in ignored
    clean = (REPO_ROOT / "Makefile").read_text().split("\nclean:")[1].split("\n\n")[0]
    assert "$(VENV_FLOOR)" in clean and "$(VENV_LATEST)" in clean


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layers_import_downwards_only():
    """entry_points -> carclf -> carclf_flavor: the library never imports a step, the flavor neither."""
    forbidden = {"carclf": ("entry_points",), "carclf_flavor": ("entry_points", "carclf")}
    offenders = []
    for package, tops in forbidden.items():
        for source in sorted((REPO_ROOT / package).rglob("*.py")):
            if source.relative_to(REPO_ROOT).as_posix() == "carclf/cli/mlproject.py":
                continue  # the MLproject generator reads every step's declaration, by design
            for module in _imported_modules(source):
                if module.split(".")[0] in tops:
                    offenders.append(f"{source.relative_to(REPO_ROOT)} imports {module}")
    assert not offenders, "\n".join(offenders)
