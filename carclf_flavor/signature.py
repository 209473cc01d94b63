"""What a request to a carclf model looks like, and its answer: columns, params, logged signature, input example.

Every input column is ``Any`` and optional (see ``input_schema``): carclf's own code (``carclf_flavor.pyfunc``)
reads and checks the request, naming the row. Every output column is a plain type (see ``output_schema``), so that
both Unity Catalog (which refuses a signature without outputs) and Azure's no-code scorer (which builds a sample
DataFrame of the outputs at start-up) accept the model.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib

import numpy as np

IMAGE_COLUMN = "image"
BBOX_COLUMNS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
ERROR_COLUMN = "error"
OUTPUT_COLUMNS = ("label", "class_id", "prob", "top_k")
ERROR_MODES = ("raise", "coerce")
# The params default: the deployment's error mode (CARCLF_ERRORS, else model_config `errors`, else coerce under
# Azure's inference server, whose no-code scorer answers every exception with a fixed HTTP 500 text, and raise
# elsewhere: carclf_flavor.pyfunc).
AUTO_ERROR_MODE = "auto"
DEFAULT_TOP_K = 5
# How the ranked classes travel: "json" (the signature's plain string column: a JSON list of {label, prob}) or
# "list" (that list as a nested value, the REST answer of models saved without an output schema).
TOP_K_FORMATS = ("json", "list")
DEFAULT_TOP_K_FORMAT = "json"


def input_schema():
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    # Every column is `Any` and optional so that carclf's own code, not MLflow's schema enforcement, reads the
    # request: MLflow's errors repeat the whole request in a multi-line message, its base64 decoding of
    # `binary` columns only happens for `dataframe_split` (not `inputs`/`instances`, nor Azure's scorer, which
    # passes base64 as plain strings), and its lenient decoder turns text that is not base64 into an empty image.
    # The image: base64 text (line breaks allowed) or raw bytes in-process. The bbox columns hold integer pixel
    # coordinates, checked by predict (naming the row): as `long` MLflow would cast 1.5 to 1 silently.
    return Schema(
        [ColSpec(AnyType(), IMAGE_COLUMN, required=False)]
        + [ColSpec(AnyType(), name, required=False) for name in BBOX_COLUMNS]
    )


def params_schema():
    from mlflow.types import ParamSchema, ParamSpec

    return ParamSchema(
        [
            ParamSpec("top_k", "long", DEFAULT_TOP_K),
            ParamSpec("errors", "string", AUTO_ERROR_MODE),
            ParamSpec("top_k_format", "string", DEFAULT_TOP_K_FORMAT),
        ]
    )


def output_schema():
    """The answer, one row per image: ``label`` string, ``class_id`` long, ``prob`` double, ``top_k`` string (JSON
    list of {label, prob}, most likely first; ``[]`` for a bad row) and ``error`` string (null, or with
    errors=coerce the reason a row could not be scored).

    Plain types only: Azure's scorer calls ``Schema.pandas_types()`` on the outputs, which refuses ``Array`` and
    ``Object``; ``mlflow.pyfunc.spark_udf`` without a ``result_type`` builds its struct from these types.
    """
    from mlflow.types import ColSpec, Schema

    return Schema(
        [
            ColSpec("string", "label"),
            ColSpec("long", "class_id"),
            ColSpec("double", "prob"),
            ColSpec("string", "top_k"),
            ColSpec("string", ERROR_COLUMN),
        ]
    )


def default_signature():
    """Inputs, outputs (plain types) and params: what Unity Catalog and Azure's no-code scorer both accept."""
    from mlflow.models import ModelSignature

    return ModelSignature(inputs=input_schema(), outputs=output_schema(), params=params_schema())


def top_k_as_json(ranked) -> str:
    """The ``top_k`` column's text: a JSON list of {label, prob}."""
    return json.dumps(list(ranked), ensure_ascii=False)


def top_k_entries(value) -> list:
    """A ``top_k`` value as the list of {label, prob} it stands for, whichever form the model answered in (JSON
    text from models with an output schema, a nested list from models saved without one)."""
    if isinstance(value, str):
        return json.loads(value) if value else []
    return list(value) if value is not None else []


def _default_input_example_image() -> bytes:
    """A small real JPEG (a car-coloured gradient) for the logged input example."""
    import cv2

    height, width = 48, 64
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 4) % 256, (y * 5) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def _normalise_input_example(input_example):
    """The example as a DataFrame whose images are one-line base64 text, exactly what a REST client sends.

    MLflow would write bytes as MIME base64 (a line break every 76 characters); one-line text is what clients
    copy from Azure's swagger page and from ``serving_input_example.json``.
    """
    import pandas as pd

    if input_example is None:
        input_example = _default_input_example_image()
    if isinstance(input_example, (str, os.PathLike)) and pathlib.Path(input_example).is_file():
        input_example = pathlib.Path(input_example).read_bytes()
    if isinstance(input_example, (bytes, bytearray)):
        input_example = pd.DataFrame({IMAGE_COLUMN: [bytes(input_example)]})
    if isinstance(input_example, pd.DataFrame) and IMAGE_COLUMN in input_example.columns:
        input_example = input_example.copy()
        input_example[IMAGE_COLUMN] = [
            base64.b64encode(bytes(value)).decode("ascii") if isinstance(value, (bytes, bytearray)) else value
            for value in input_example[IMAGE_COLUMN]
        ]
    return input_example
