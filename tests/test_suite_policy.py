"""How the suite itself behaves: a broken install fails instead of skipping, CI cannot silently skip the offline
Azure tests, `make test-fast` deselects the slow tests, and `make lint` runs ruff as configured."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import tomllib

import pytest
from packaging.requirements import Requirement

import helpers_deploy
from conftest import REPO_ROOT


def _required_distributions() -> set[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    return {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in requirements}


def _importorskipped_modules() -> list[tuple[str, str]]:
    found = []
    for path in sorted((REPO_ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.append((path.name, str(node.args[0].value)))
    return found


def test_no_test_skips_on_a_missing_hard_dependency():
    """`importorskip` of a package pyproject requires would turn a broken install into green skips."""
    required = _required_distributions()
    assert {"tensorflow", "keras", "mlflow", "pytest"} <= required
    providers = importlib.metadata.packages_distributions()
    offenders = []
    for file_name, module in _importorskipped_modules():
        distributions = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(module.split(".")[0], [])}
        # tensorflow is imported as `tensorflow` but installed as tensorflow-cpu (or tensorflow).
        if distributions & required or module.split(".")[0] in {"tensorflow", "keras"}:
            offenders.append(f"{file_name}: importorskip({module!r})")
    assert not offenders, f"hard dependencies must be imported plainly: {offenders}"


@pytest.fixture
def no_unshare(tmp_path, monkeypatch):
    """A PATH without `unshare` (util-linux), as on a machine that lacks it."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    helpers_deploy.unshare_problem.cache_clear()
    yield
    helpers_deploy.unshare_problem.cache_clear()


def test_offline_azure_tests_fail_in_ci_when_unshare_is_missing(no_unshare, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="unshare .*not installed.*CI is set"):
        helpers_deploy.require_unshare()


def test_offline_azure_tests_skip_outside_ci_when_unshare_is_missing(no_unshare, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="cannot isolate the azureml plugin .*not installed"):
        helpers_deploy.require_unshare()


def _make_dry_run(target: str) -> str:
    # -o: treat the venv as up to date, so the dry run prints only the target's own commands.
    run = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_make_test_fast_deselects_the_slow_tests():
    assert re.search(r'-m pytest -m "not slow"', _make_dry_run("test-fast"))
    phony = re.search(r"^\.PHONY:(.*)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert {"test-fast", "lint"} <= set(phony)


def test_make_lint_runs_the_pinned_ruff_as_pre_commit_does():
    commands = _make_dry_run("lint")
    assert "ruff check ." in commands and "ruff format --check ." in commands
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    pinned = [
        Requirement(r) for r in project["project"]["optional-dependencies"]["test"] if Requirement(r).name == "ruff"
    ]
    assert len(pinned) == 1 and str(pinned[0].specifier).startswith("==")
    version = str(pinned[0].specifier)[2:]
    assert f"rev: v{version}" in (REPO_ROOT / ".pre-commit-config.yaml").read_text()
    assert project["tool"]["ruff"]["line-length"] == 120
