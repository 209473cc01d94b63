"""Writes ``MLproject`` from the steps' configs (``make mlproject``); ``--check`` fails when the file differs.

Each converted step declares its parameters once, in a frozen config dataclass (``entry_points.step_config``);
its MLproject entry (parameters, types, defaults and the command line) is generated from that declaration,
so MLproject, argparse and the step function cannot drift apart. ``tests/test_mlproject.py`` refuses a
checked-in MLproject that differs from this output.

MLflow types: numbers are ``float`` (MLflow passes "224" as given, or "224.0", and ``parse_int`` reads
both), text and booleans are ``string``, a field may declare ``path`` (MLflow resolves it to an absolute
path). ``None`` is written as ``""``.

    python -m entry_points.mlproject            # rewrite MLproject
    python -m entry_points.mlproject --check    # exit 1 when MLproject is not what the configs say
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import sys
from typing import NamedTuple, Optional

from entry_points.step_config import FieldSpec, field_specs

MLPROJECT = pathlib.Path(__file__).resolve().parent.parent / "MLproject"

HEADER = "name: carclf\n\nconda_env: conda.yaml\n\nentry_points:\n"
COMMAND_WIDTH = 114  # characters per command line, indentation included


class Step(NamedTuple):
    name: str                   # MLproject entry point
    module: str                 # python -m <module>
    config: Optional[str]       # name of the config class in ``module``; None = TEMPORARY verbatim entry below
    fixed_args: tuple = ()      # flags written before the parameters (score's ``--spark``)


# MLproject's entry points, in file order.
STEPS = (
    Step("main", "entry_points.main", None),
    Step("preprocess", "entry_points.preprocess", "PreprocessConfig"),
    Step("augment", "entry_points.augment", "AugmentConfig"),
    Step("deploy", "entry_points.deploy", "DeployConfig"),
    Step("score", "entry_points.score", "ScoreSparkConfig", ("--spark",)),
    Step("train", "entry_points.train", None),
    Step("evaluate", "entry_points.evaluate", "EvaluateConfig"),
)

# TEMPORARY: entries whose step has no config yet (train and main were being changed on other branches when the
# generator was written; converting them there would have conflicted). Copied verbatim from MLproject; delete an
# entry when its step gets a config (then set ``Step.config`` above).
VERBATIM = {
    "main": '''\
  main:
    parameters:
      data_dir: {type: string, default: ""}
      output_dir: {type: string, default: data}
      image_size: {type: float, default: 64}
      crop: {type: string, default: bbox}
      copies: {type: float, default: 1}
      ops: {type: string, default: "crop,pad,flip"}
      spark_master: {type: string, default: "local[*]"}
      depth: {type: float, default: 18}
      width: {type: float, default: 0.25}
      weights: {type: string, default: none}
      epochs: {type: float, default: 20}
      head_epochs: {type: float, default: 0}
      batch_size: {type: float, default: 16}
      learning_rate: {type: float, default: 0.003}
      optimizer: {type: string, default: adam}
      registered_model_name: {type: string, default: carclf}
      deploy_target: {type: string, default: ""}
      deploy_name: {type: string, default: carclf-sample}
      force: {type: string, default: "false"}
      seed: {type: float, default: 0}
    command: >-
      python -m entry_points.main --data-dir {data_dir} --output-dir {output_dir} --image-size {image_size}
      --crop {crop} --copies {copies} --ops {ops} --spark-master {spark_master} --depth {depth} --width {width}
      --weights {weights} --epochs {epochs} --head-epochs {head_epochs} --batch-size {batch_size}
      --learning-rate {learning_rate} --optimizer {optimizer} --registered-model-name {registered_model_name}
      --deploy-target {deploy_target} --deploy-name {deploy_name} --force {force} --seed {seed}
''',
    "train": '''\
  train:
    parameters:
      train_data: {type: string}
      val_data: {type: string}
      test_data: {type: string, default: ""}
      depth: {type: float, default: 50}
      width: {type: float, default: 1.0}
      weights: {type: string, default: imagenet}
      epochs: {type: float, default: 30}
      head_epochs: {type: float, default: 3}
      batch_size: {type: float, default: 32}
      learning_rate: {type: float, default: 0.001}
      head_learning_rate: {type: float, default: 0}
      optimizer: {type: string, default: sgd}
      momentum: {type: float, default: 0.9}
      weight_decay: {type: float, default: 0}
      lr_schedule: {type: string, default: cosine}
      label_smoothing: {type: float, default: 0.1}
      online_augment: {type: string, default: "true"}
      precision: {type: string, default: float32}
      dropout: {type: float, default: 0}
      bn_momentum: {type: float, default: 0}
      checkpoint_dir: {type: string, default: checkpoints/train}
      resume: {type: string, default: "false"}
      registered_model_name: {type: string, default: carclf}
      seed: {type: float, default: 0}
    command: >-
      python -m entry_points.train --train-data {train_data} --val-data {val_data} --test-data {test_data}
      --depth {depth} --width {width} --weights {weights} --epochs {epochs} --head-epochs {head_epochs}
      --batch-size {batch_size} --learning-rate {learning_rate} --head-learning-rate {head_learning_rate}
      --optimizer {optimizer} --momentum {momentum} --weight-decay {weight_decay} --lr-schedule {lr_schedule}
      --label-smoothing {label_smoothing} --online-augment {online_augment} --precision {precision}
      --dropout {dropout} --bn-momentum {bn_momentum} --checkpoint-dir {checkpoint_dir} --resume {resume}
      --registered-model-name {registered_model_name} --seed {seed}
''',
}

_PLAIN = re.compile(r"[A-Za-z0-9_./-]+")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"}


def yaml_scalar(value) -> str:
    """A default as MLproject writes it: plain when YAML reads it back as the same string, else quoted."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return '"true"' if value else '"false"'
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS and not re.fullmatch(r"[-+]?[0-9.]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mlproject_fields(config_cls: type) -> list[FieldSpec]:
    return [s for s in field_specs(config_cls) if s.cli and s.mlproject]


def config_class(step: Step) -> type:
    return getattr(importlib.import_module(step.module), step.config)


def render_entry(step: Step) -> str:
    if step.config is None:
        return VERBATIM[step.name]
    fields = mlproject_fields(config_class(step))
    lines = [f"  {step.name}:", "    parameters:"]
    for spec in fields:
        default = "" if spec.required else f", default: {yaml_scalar(spec.default)}"
        lines.append(f"      {spec.name}: {{type: {spec.mlproject_type}{default}}}")
    # Words of the command; a "--flag {value}" pair stays on one line.
    words = [" ".join(["python", "-m", step.module, *step.fixed_args])]
    words += [f"{spec.flag} {{{spec.name}}}" for spec in fields]
    lines += ["    command: >-", *_wrap(words, indent=" " * 6)]
    return "\n".join(lines) + "\n"


def _wrap(words: list[str], indent: str) -> list[str]:
    out = [indent + words[0]]
    for word in words[1:]:
        if len(out[-1]) + 1 + len(word) > COMMAND_WIDTH:
            out.append(indent + word)
        else:
            out[-1] += " " + word
    return out


def render() -> str:
    return HEADER + "\n".join(render_entry(step) for step in STEPS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entry_points.mlproject", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when MLproject differs")
    parser.add_argument("--path", type=pathlib.Path, default=MLPROJECT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.path.read_text() if args.path.exists() else ""
        if current != text:
            print(f"error: {args.path} differs from the step configs; run `make mlproject`", file=sys.stderr)
            return 1
        return 0
    partial = args.path.with_name(f".{args.path.name}.partial")
    partial.write_text(text)
    partial.replace(args.path)  # a reader never sees half a file
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
