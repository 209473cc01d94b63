"""Errors a carclf model answers with, and the one wording of "the first bad row, and N more".

``InvalidInputError`` is built on first use (PEP 562 ``__getattr__``): importing MLflow costs ~2 s and
``carclf_flavor.images`` users (Spark workers) never need it. Its public home is ``carclf_flavor``.
"""

from __future__ import annotations

from collections.abc import Sequence

_invalid_input_class = None


def _invalid_input_error_class():
    """Build the MlflowException subclass on first use (importing MLflow costs ~2 s; images.py users skip it)."""
    global _invalid_input_class
    if _invalid_input_class is None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        class InvalidInputError(MlflowException):
            """A bad request (image, bbox or parameter): HTTP 400 with a one-line message, no stack trace.

            MLflow's scoring server rewrites ``e.message`` to "Failed to predict data '<repr of the whole
            input DataFrame>'. Error: ..." before answering; that repr holds raw image bytes and spans many
            lines, so the message set at construction is kept.
            """

            def __init__(self, message: str):
                super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
                self.__dict__["_frozen_message"] = str(message)

            @property
            def message(self):
                return self.__dict__.get("_frozen_message", self.__dict__.get("_message"))

            @message.setter
            def message(self, value):
                if "_frozen_message" not in self.__dict__:
                    self.__dict__["_message"] = value

        # Its public home (carclf_flavor.__getattr__ hands it out): repr and pickling name that module.
        InvalidInputError.__module__ = "carclf_flavor"
        InvalidInputError.__qualname__ = "InvalidInputError"
        _invalid_input_class = InvalidInputError
    return _invalid_input_class


def __getattr__(name):  # PEP 562: `InvalidInputError` without importing MLflow up front
    if name == "InvalidInputError":
        return _invalid_input_error_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def invalid_input(message: str):
    """An ``InvalidInputError`` (HTTP 400) with this one-line message."""
    return _invalid_input_error_class()(message)


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
