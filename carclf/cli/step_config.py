"""One declaration per step parameter: a frozen dataclass whose fields carry default, help and MLproject type.

From that one declaration come the step's argparse CLI (``build_parser``), the step function's keyword
arguments (``resolve_config``) and the step's entry in ``MLproject`` (``carclf.cli.mlproject``, run by
``make mlproject``): a default is written once, in the config.

Defaults rule (settles the old drift where MLproject gave a default that argparse made required): a field
with a default has that default everywhere (function, CLI, MLproject); a field without one is required
everywhere. ``None`` ("not set") is written as ``""`` in MLproject and an empty CLI value reads back as
``None``, because MLflow always passes every parameter, as a string.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from carclf.cli.cli_args import parse_bool, parse_int

log = logging.getLogger(__name__)

_META = "carclf"


def param(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: Sequence[str] | None = None,
    mlproject_type: str | None = None,
    cli: bool = True,
    mlproject: bool = True,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A config field. ``mlproject_type`` overrides the MLproject type (e.g. ``"path"``); ``cli=False`` keeps a
    field off the command line, ``mlproject=False`` keeps a CLI flag out of MLproject; ``parse`` replaces the
    type's CLI parser (e.g. one that refuses non-positive numbers)."""
    meta = {
        _META: {
            "help": help,
            "choices": tuple(choices) if choices else None,
            "mlproject_type": mlproject_type,
            "cli": cli,
            "mlproject": mlproject,
            "parse": parse,
        }
    }
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What one config field means to argparse and to MLproject."""

    name: str
    kind: type  # int, float, bool or str
    optional: bool  # ``X | None``: "" means None
    default: Any  # dataclasses.MISSING when required
    help: str
    choices: tuple | None
    mlproject_type: str
    cli: bool
    mlproject: bool
    parse: Callable[[str], Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def _unwrap(annotation) -> tuple[type, bool]:
    """(base type, optional?) of ``int``, ``int | None``, ``Optional[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"config fields take one type (or X | None), got {annotation!r}")
        return args[0], True
    return annotation, False


def field_specs(config_cls: type) -> list[FieldSpec]:
    hints = typing.get_type_hints(config_cls)
    specs = []
    for f in dataclasses.fields(config_cls):
        meta = f.metadata.get(_META, {})
        kind, optional = _unwrap(hints[f.name])
        if kind not in (int, float, bool, str):
            raise TypeError(f"{config_cls.__name__}.{f.name}: unsupported type {kind!r}")
        mltype = meta.get("mlproject_type") or ("float" if kind in (int, float) and not optional else "string")
        specs.append(
            FieldSpec(
                name=f.name,
                kind=kind,
                optional=optional,
                default=f.default,
                help=meta.get("help", ""),
                choices=meta.get("choices"),
                mlproject_type=mltype,
                cli=meta.get("cli", True),
                mlproject=meta.get("mlproject", True),
                parse=meta.get("parse"),
            )
        )
    return specs


def parse_float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


_PARSERS: dict = {int: parse_int, float: parse_float, bool: parse_bool, str: str}


def _optional(parse: Callable) -> Callable:
    def parse_optional(value):
        return None if value is None or str(value).strip() == "" else parse(value)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; one clear line is enough
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def add_arguments(parser: argparse.ArgumentParser, config_cls: type, *, enforce_required: bool = True) -> None:
    """One ``--field-name`` per CLI field, parsed by the field's type, default and choices from it.
    ``enforce_required=False``: required fields default to None, for a CLI whose other modes do not need them
    (the caller checks)."""
    for spec in field_specs(config_cls):
        if not spec.cli:
            continue
        parse = spec.parse or _PARSERS[spec.kind]
        kwargs: dict = {
            "type": _optional(parse) if spec.optional else parse,
            "dest": spec.name,
            "help": spec.help.replace("%", "%%") or None,
        }
        if spec.choices:
            kwargs["choices"] = spec.choices
        if not spec.required:
            kwargs["default"] = spec.default
        elif enforce_required:
            kwargs["required"] = True
        else:
            kwargs["default"] = None
        parser.add_argument(spec.flag, **kwargs)


def build_parser(config_cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """argparse from the config, with one-line errors."""
    parser = OneLineErrorParser(prog=prog, description=description)
    add_arguments(parser, config_cls)
    return parser


def resolve_config(config_cls: type, config: Any = None, **overrides) -> Any:
    """The step's config: ``config`` (or the defaults) with ``overrides`` applied; a TypeError names an
    unknown or missing parameter, as a keyword call would."""
    if config is not None and not isinstance(config, config_cls):
        raise TypeError(f"expected a {config_cls.__name__} (or keyword arguments), got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {config_cls.__name__} parameter(s): {', '.join(unknown)}")
    if config is not None:
        return dataclasses.replace(config, **overrides) if overrides else config
    return config_cls(**overrides)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    return config_cls(
        **{
            name: value
            for name, value in vars(args).items()
            if name in {f.name for f in dataclasses.fields(config_cls)}
        }
    )


def run_step(
    step: Callable,
    config_cls: type,
    prog: str,
    description: str,
    argv: Sequence[str] | None = None,
    *,
    expected_errors: tuple = (),
    print_result: Callable[[Any, Any], None] | None = None,
    error_line: Callable[[BaseException, Any], str | None] | None = None,
    exit_codes: Mapping[type, int] | None = None,
    interrupted_line: str | None = None,
    log_format: str = "%(asctime)s %(name)s %(levelname)s %(message)s",
) -> int:
    """The CLI ``main()`` of a step: parse -> ``step(config)`` -> ``print_result(result, config)``; the step's
    expected errors end as one ``error: ...`` line and exit code 2 (or ``exit_codes[type]``), anything else is
    a bug and keeps its traceback. ``error_line(exc, config)`` may word an error (or return None to re-raise
    it). With ``interrupted_line``, Ctrl-C prints it and exits 130 instead of a traceback."""
    args = build_parser(config_cls, prog, description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=log_format)
    config = config_from_args(config_cls, args)
    try:
        result = step(config)
    except KeyboardInterrupt:
        if interrupted_line is None:
            raise
        print(f"interrupted: {interrupted_line}", file=sys.stderr)
        return 130
    except Exception as exc:
        line = None
        if error_line is not None:
            line = error_line(exc, config)
        elif isinstance(exc, expected_errors):
            line = str(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return next((code for kind, code in (exit_codes or {}).items() if isinstance(exc, kind)), 2)
    if print_result is None:
        print(result)
    else:
        print_result(result, config)
    return 0
