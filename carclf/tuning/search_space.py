"""The search space of `tune`: which `train` parameters a trial samples, and how.

A space maps `train` parameter names to one of
- a fixed value (``weights: none``): every trial uses it;
- a list (``optimizer: [adam, sgd]``): a choice;
- ``{low: ..., high: ..., log: true|false}``: a range, integers when both ends are integers, ``log`` for a
  log-uniform draw (``learning_rate: {low: 0.0003, high: 0.01, log: true}``).

``load_space(path)`` reads a YAML file of that form; ``check_space(space, train_data, val_data)`` proves every
value against `train`'s own checks before any trial starts (a choice's every value, a range's both ends,
each with the other parameters at their first value), so a typo or an impossible range is one line naming the
key (``SearchSpaceError``), not a failed trial. ``sample(trial, space)`` turns an Optuna trial into `train`
keyword arguments.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

# Parameters of train() that a trial never chooses: the data, and what `tune` sets per trial itself.
NOT_TUNABLE = ("train_data", "val_data", "test_data", "checkpoint_dir", "resume", "registered_model_name", "callbacks")
RANGE_KEYS = ("low", "high", "log")

# What every trial starts from before the space is applied: no pretrained weights (none can be downloaded
# on many clusters, and `train` picks its from-scratch optimizer defaults then).
TRIAL_BASE = {"weights": "none"}

# The default space: small to mid ResNets from scratch, the knobs that matter most on a new data set.
DEFAULT_SPACE_YAML = """\
depth: [18, 34, 50]
width: [0.25, 0.5, 1.0]
learning_rate: {low: 0.0001, high: 0.01, log: true}
batch_size: [16, 32, 64]
optimizer: [adam, sgd]
label_smoothing: {low: 0.0, high: 0.2}
dropout: {low: 0.0, high: 0.5}
augment_strength: {low: 0.0, high: 1.5}
head_epochs: {low: 0, high: 3}
epochs: {low: 10, high: 30}
"""


class SearchSpaceError(ValueError):
    """A bad search space; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class Fixed:
    value: Any


@dataclasses.dataclass(frozen=True)
class Choice:
    options: tuple


@dataclasses.dataclass(frozen=True)
class Range:
    low: int | float
    high: int | float
    log: bool = False

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


Dimension = Fixed | Choice | Range


def tunable_parameters() -> dict[str, str]:
    """train's parameter name -> its declared type name ("int", "float", "str", "bool"), from ``TrainConfig``."""
    from carclf.training.config import TrainConfig

    out = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in NOT_TUNABLE:
            continue
        annotation = field.type
        out[field.name] = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(kind: str, value):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: take numeric strings for numeric parameters."""
    if kind in ("int", "float") and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if kind == "int" and number.is_integer() and "." not in value else number
    return value


def _check_type(where: str, kind: str, value) -> None:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": _is_number(value) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(kind, True)
    if not ok:
        expected = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[kind]
        raise SearchSpaceError(f"{where}: expected {expected}, got {value!r}")


def parse_space(raw, source: str = "space") -> dict[str, Dimension]:
    """A mapping as read from YAML -> {name: Fixed | Choice | Range}; SearchSpaceError names the key."""
    if raw is None:
        raise SearchSpaceError(f"{source}: empty; expected a mapping of train parameter names to values")
    if not isinstance(raw, Mapping):
        raise SearchSpaceError(
            f"{source}: expected a mapping of train parameter names to values, got {type(raw).__name__}"
        )
    tunable = tunable_parameters()
    space: dict[str, Dimension] = {}
    for name, spec in raw.items():
        where = f"{source}: {name}"
        if name not in tunable:
            raise SearchSpaceError(
                f"{where}: not a train parameter that a trial can set (one of: {', '.join(sorted(tunable))})"
            )
        kind = tunable[name]
        if isinstance(spec, Mapping):
            unknown = sorted(set(map(str, spec)) - set(RANGE_KEYS))
            if unknown or "low" not in spec or "high" not in spec:
                raise SearchSpaceError(
                    f"{where}: a range is {{low: ..., high: ..., log: true|false}}"
                    + (f"; unknown key(s) {', '.join(unknown)}" if unknown else "; low and high are required")
                )
            low, high, log = _coerce(kind, spec["low"]), _coerce(kind, spec["high"]), spec.get("log", False)
            if kind not in ("int", "float"):
                raise SearchSpaceError(f"{where}: a range needs a numeric parameter; {name} is {kind}: use a list")
            for end, value in (("low", low), ("high", high)):
                if not _is_number(value) or not math.isfinite(value):
                    raise SearchSpaceError(f"{where}: {end} must be a number, got {value!r}")
            if not isinstance(log, bool):
                raise SearchSpaceError(f"{where}: log must be true or false, got {log!r}")
            if not low < high:
                raise SearchSpaceError(
                    f"{where}: low ({low}) must be below high ({high}); for one value write it plainly"
                )
            if log and low <= 0:
                raise SearchSpaceError(f"{where}: a log range needs low > 0, got {low}")
            dimension = Range(low, high, log)
            if kind == "int" and not dimension.integer:
                raise SearchSpaceError(
                    f"{where}: {name} is an integer: low and high must be integers, got {low!r} and {high!r}"
                )
            space[name] = dimension
        elif isinstance(spec, (list, tuple)):
            if not spec:
                raise SearchSpaceError(f"{where}: an empty list offers nothing to choose")
            spec = [_coerce(kind, value) for value in spec]
            for value in spec:
                _check_type(where, kind, value)
            if len(set(map(repr, spec))) != len(spec):
                raise SearchSpaceError(f"{where}: the list repeats a value: {list(spec)}")
            space[name] = Choice(tuple(spec))
        else:
            spec = _coerce(kind, spec)
            _check_type(where, kind, spec)
            space[name] = Fixed(spec)
    return space


def load_space(path: str | pathlib.Path | None) -> dict[str, Dimension]:
    """The space in the YAML file ``path``, or the default space when ``path`` is empty."""
    import yaml

    if not path:
        return parse_space(yaml.safe_load(DEFAULT_SPACE_YAML), "default space")
    path = pathlib.Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"space file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SearchSpaceError(f"space file {path}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise SearchSpaceError(f"space file {path}: not a UTF-8 text file") from None
    return parse_space(raw, f"space file {path}")


def _candidates(dimension: Dimension) -> tuple:
    if isinstance(dimension, Fixed):
        return (dimension.value,)
    if isinstance(dimension, Choice):
        return dimension.options
    return (dimension.low, dimension.high)


def _first(dimension: Dimension):
    return _candidates(dimension)[0]


def check_space(space: Mapping[str, Dimension], train_data, val_data, source: str = "space") -> None:
    """Run `train`'s own validation on every candidate value (with the other parameters at their first
    value) before any trial: SearchSpaceError naming the key and train's complaint."""
    from carclf.data.hdf5_dataset import DatasetError
    from carclf.data.input_pipeline import split_paths
    from carclf.training.config import TrainConfig
    from carclf.training.validation import TrainConfigError, optimizer_defaults, validate

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {
        "train_data": ",".join(map(str, split_paths(train_data))),
        "val_data": ",".join(map(str, split_paths(val_data))),
    }
    first = {name: _first(d) for name, d in space.items()}
    for name, dimension in space.items():
        for value in _candidates(dimension):
            params = {**TRIAL_BASE, **first, name: value}
            optimizer, learning_rate = optimizer_defaults(
                params.get("weights", "none"), params.get("optimizer", "auto"), params.get("learning_rate", 0.0)
            )
            params.update(optimizer=optimizer, learning_rate=learning_rate)
            config = TrainConfig(**data, **{k: v for k, v in params.items() if k in fields})
            try:
                validate(config)
            except DatasetError:
                raise  # the data itself: not the space's fault, reported as it is
            except TrainConfigError as exc:
                raise SearchSpaceError(f"{source}: {name}: value {value!r} is refused by train: {exc}") from None


def with_absolute_paths(space: Mapping[str, Dimension]) -> dict[str, Dimension]:
    """The space with its file values (``weights: my/weights.h5``) made absolute on the driver: a trial runs
    in a Spark task whose working directory is not the driver's."""
    from carclf.training.validation import weights_argument

    def absolute(value):
        path = weights_argument(value)
        return str(pathlib.Path(path).absolute()) if path not in (None, "imagenet") else value

    out = dict(space)
    dimension = space.get("weights")
    if isinstance(dimension, Fixed):
        out["weights"] = Fixed(absolute(dimension.value))
    elif isinstance(dimension, Choice):
        out["weights"] = Choice(tuple(absolute(option) for option in dimension.options))
    return out


def sample(trial, space: Mapping[str, Dimension]) -> dict:
    """`train` keyword arguments for one Optuna trial: fixed values as they are, the rest suggested."""
    params = dict(TRIAL_BASE)
    for name, dimension in space.items():
        if isinstance(dimension, Fixed):
            params[name] = dimension.value
        elif isinstance(dimension, Choice):
            params[name] = trial.suggest_categorical(name, list(dimension.options))
        elif dimension.integer:
            params[name] = trial.suggest_int(name, dimension.low, dimension.high, log=dimension.log)
        else:
            params[name] = trial.suggest_float(name, float(dimension.low), float(dimension.high), log=dimension.log)
    return params


def describe(space: Mapping[str, Dimension]) -> str:
    """One line per parameter, for the log and the tune run's artifact."""
    lines = []
    for name, d in space.items():
        if isinstance(d, Fixed):
            lines.append(f"{name}: {d.value!r}")
        elif isinstance(d, Choice):
            lines.append(f"{name}: one of {list(d.options)}")
        else:
            lines.append(
                f"{name}: {'integer' if d.integer else 'number'} in [{d.low}, {d.high}]"
                + (" (log scale)" if d.log else "")
            )
    return "\n".join(lines)
