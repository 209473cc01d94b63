"""MLproject is generated from the steps' configs (`make mlproject`): the checked-in file is that output, and what
MLflow passes by default is what the CLI and the step function take by default."""

import dataclasses
import importlib
import shlex

import pytest
import yaml

from carclf.cli import mlproject
from carclf.cli.step_config import field_specs, resolve_config
from conftest import REPO_ROOT

CONVERTED = [step for step in mlproject.STEPS if step.config is not None]


def test_checked_in_mlproject_is_the_generated_one():
    assert (REPO_ROOT / "MLproject").read_text() == mlproject.render(), "MLproject is stale: run `make mlproject`"


def test_check_mode_refuses_a_changed_file(tmp_path, capsys):
    copy = tmp_path / "MLproject"
    copy.write_text(mlproject.render())
    assert mlproject.main(["--check", "--path", str(copy)]) == 0
    changed = mlproject.render().replace("default: data/processed}", "default: data/elsewhere}")
    assert changed != mlproject.render()
    copy.write_text(changed)
    assert mlproject.main(["--check", "--path", str(copy)]) == 1
    assert "make mlproject" in capsys.readouterr().err


def _mlflow_argv(spec: dict, module: str) -> list:
    """The step's argv as `mlflow run` builds it from the defaults (required ones get a placeholder)."""
    values = {name: ("placeholder" if "default" not in p else p["default"]) for name, p in spec["parameters"].items()}
    command = spec["command"].format(**{k: shlex.quote(str(v)) for k, v in values.items()})
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", module]
    return words[3:]


@pytest.mark.parametrize("step", CONVERTED, ids=lambda s: s.name)
def test_mlproject_defaults_are_the_cli_and_function_defaults(step):
    spec = yaml.safe_load((REPO_ROOT / "MLproject").read_text())["entry_points"][step.name]
    module = importlib.import_module(step.module)
    config_cls = getattr(module, step.config)
    args = module.build_parser().parse_args(_mlflow_argv(spec, step.module))
    checked = 0
    for field in field_specs(config_cls):
        if not (field.cli and field.mlproject):
            assert field.name not in spec["parameters"]
            continue
        declared = spec["parameters"][field.name]
        assert declared["type"] == field.mlproject_type
        if field.required:
            assert "default" not in declared and getattr(args, field.name) == "placeholder"
        else:
            assert getattr(args, field.name) == field.default, f"{step.name}.{field.name}"
            checked += 1
    assert checked, f"{step.name}: no default compared"


@pytest.mark.parametrize("step", CONVERTED, ids=lambda s: s.name)
def test_configs_are_frozen_with_help(step):
    config_cls = getattr(importlib.import_module(step.module), step.config)
    assert config_cls.__dataclass_params__.frozen
    assert all(field.help for field in field_specs(config_cls)), f"{step.name}: a parameter has no help"


def test_resolve_config_names_unknown_parameters():
    from entry_points.preprocess import PreprocessConfig

    config = resolve_config(PreprocessConfig, image_size=32)
    assert config.image_size == 32 and config.crop == "bbox"
    assert resolve_config(PreprocessConfig, config, seed=3) == dataclasses.replace(config, seed=3)
    with pytest.raises(TypeError, match="image_sise"):
        resolve_config(PreprocessConfig, image_sise=32)
    with pytest.raises(TypeError, match="PreprocessConfig"):
        resolve_config(PreprocessConfig, "data/cars")  # an old positional call fails loudly


def test_mlflow_float_spelling_reaches_int_fields():
    from entry_points.evaluate import EvaluateConfig, build_parser

    args = build_parser().parse_args(["--model-uri", "m", "--test-data", "t.h5", "--batch-size", "8.0"])
    assert args.batch_size == 8 and isinstance(args.batch_size, int)
    assert EvaluateConfig(**vars(args)).batch_size == 8


@pytest.mark.parametrize("step", CONVERTED, ids=lambda s: s.name)
def test_an_omitted_flag_takes_the_mlproject_default(step):
    """The settled drift: a parameter with an MLproject default has it on the CLI too (augment's input/output,
    deploy's target/name, score's output required or None there by the CLI alone)."""
    spec = yaml.safe_load((REPO_ROOT / "MLproject").read_text())["entry_points"][step.name]
    module = importlib.import_module(step.module)
    required = [f for f in field_specs(getattr(module, step.config)) if f.cli and f.required]
    argv = [*step.fixed_args, *[word for f in required for word in (f.flag, "placeholder")]]
    args = module.build_parser().parse_args(argv)
    for name, declared in spec["parameters"].items():
        if "default" in declared:
            default = getattr(args, name)
            as_mlflow_passes = "" if default is None else str(default).lower() if isinstance(default, bool) else default
            assert as_mlflow_passes == declared["default"] or default == declared["default"], f"{step.name}.{name}"
