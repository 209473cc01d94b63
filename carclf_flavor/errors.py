"""Errors a carclf model answers with, and the one wording of "the first bad row, and N more".

``InvalidInputError`` is built on first use (PEP 562 ``__getattr__``): importing MLflow costs ~2 s and
``carclf_flavor.images`` users (Spark workers) never need it. Its public home is ``carclf_flavor``.
"""

from __future__ import annotations

from collections.abc import Sequence

_error_classes: dict = {}


def _one_line_error_class(name: str):
    """An MlflowException subclass whose message stays the one line it was built with (built on first use:
    importing MLflow costs ~2 s and images.py users skip it).

    MLflow's scoring server rewrites ``e.message`` to "Failed to predict data '<repr of the whole input
    DataFrame>'. Error: ..." before answering; that repr holds raw image bytes and spans many lines, so the
    message set at construction is kept. No stack trace is attached: the client's answer is that one line.
    """
    if name not in _error_classes:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        error_code = {"InvalidInputError": INVALID_PARAMETER_VALUE, "InternalModelError": INTERNAL_ERROR}[name]

        class OneLineError(MlflowException):
            def __init__(self, message: str):
                super().__init__(message, error_code=error_code)
                self.__dict__["_frozen_message"] = str(message)

            @property
            def message(self):
                return self.__dict__.get("_frozen_message", self.__dict__.get("_message"))

            @message.setter
            def message(self, value):
                if "_frozen_message" not in self.__dict__:
                    self.__dict__["_message"] = value

        OneLineError.__doc__ = {
            "InvalidInputError": "A bad request (image, bbox or parameter): HTTP 400 with a one-line message.",
            "InternalModelError": "An unexpected failure inside predict: HTTP 500 with a one-line message.",
        }[name]
        # Their public home (carclf_flavor.__getattr__ hands them out): repr and pickling name that module.
        OneLineError.__module__ = "carclf_flavor"
        OneLineError.__name__ = OneLineError.__qualname__ = name
        _error_classes[name] = OneLineError
    return _error_classes[name]


def _invalid_input_error_class():
    return _one_line_error_class("InvalidInputError")


def __getattr__(name):  # PEP 562: the error classes without importing MLflow up front
    if name in ("InvalidInputError", "InternalModelError"):
        return _one_line_error_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def invalid_input(message: str):
    """An ``InvalidInputError`` (HTTP 400) with this one-line message."""
    return _one_line_error_class("InvalidInputError")(message)


def internal_error(message: str):
    """An ``InternalModelError`` (HTTP 500) with this one-line message."""
    return _one_line_error_class("InternalModelError")(message)


class ModelFileError(ValueError):
    """A saved model's file that cannot be served (unreadable, malformed, disagreeing with the network)."""


def first_problem_message(problems: Sequence[str | None], item: str, hint: str = "") -> str | None:
    """``"<item> <i>: <problem> (and N more bad <item>s<hint>)"`` for the first bad entry; None when none is bad.

    ``problems``: one error text (or None) per input. The classifier says "image", the pyfunc "row".
    """
    bad = [(index, problem) for index, problem in enumerate(problems) if problem is not None]
    if not bad:
        return None
    index, problem = bad[0]
    more = f" (and {len(bad) - 1} more bad {item}s{hint})" if len(bad) > 1 else ""
    return f"{item} {index}: {problem}{more}"
