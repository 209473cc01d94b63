"""The project frame: pins agree between pyproject and conda.yaml, MLproject is well formed, CI runs make test."""
import re
import tomllib

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
    runtime = {_normalise(r) for r in _pyproject()["project"]["dependencies"]}
    _, pip_reqs = _conda_pip_requirements()
    conda = {_normalise(r) for r in pip_reqs}
    assert runtime == conda, f"only in pyproject: {runtime - conda}; only in conda.yaml: {conda - runtime}"


def test_known_pins_are_deliberate():
    deps = {_normalise(r) for r in _pyproject()["project"]["dependencies"]}
    pandas = next(d for d in deps if d.startswith("pandas"))
    assert "<3" in pandas, "pyspark.pandas does not import with pandas 3"
    mlflow_pin = next(d for d in deps if d.startswith("mlflow"))
    azure_pin = next(d for d in deps if d.startswith("azureml-mlflow"))
    # azureml-mlflow 1.62 caps mlflow at 3.15.0: the two pins must stay compatible.
    assert mlflow_pin == "mlflow==3.15.0" and ">=1.62" in azure_pin
    assert any(d.startswith("opencv-python-headless") for d in deps)
    assert not any(d.startswith("opencv-python>") or d.startswith("opencv-python=") for d in deps)


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
    for pattern in ("data/", "mlruns/", "mlflow.db", "*.h5", "*.keras", ".venv/"):
        assert pattern in ignored
