"""The pyfunc model ``mlflow models serve`` (and Azure's no-code scorer, and ``spark_udf``) runs.

It reads the request itself (every signature column is ``Any``: see ``carclf_flavor.signature``): base64 text
in any of MLflow's request formats, optional bbox columns, per-request limits, and the ``top_k`` / ``errors``
params; then hands the rows to ``CarClassifier.preprocess`` and ``CarClassifier.classify_pixels``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import math
import numbers
import os
import re
import sys

import numpy as np

from carclf_flavor.budget import (
    DEFAULT_MAX_DECODING_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    MAX_DECODING_PIXELS_ENV_VAR,
    MAX_REQUEST_PIXELS_ENV_VAR,
    RequestPixels,
)
from carclf_flavor.classifier import CarClassifier
from carclf_flavor.deadline import NO_DEADLINE, Deadline, DeadlinePassed, request_timeout_from_environment
from carclf_flavor.errors import first_problem_message, internal_error, invalid_input
from carclf_flavor.images import read_photo_header
from carclf_flavor.signature import (
    AUTO_ERROR_MODE,
    BBOX_COLUMNS,
    DEFAULT_TOP_K,
    ERROR_COLUMN,
    ERROR_MODES,
    IMAGE_COLUMN,
    OUTPUT_COLUMNS,
    TOP_K_FORMATS,
    top_k_as_json,
)

_logger = logging.getLogger("mlflow.carclf")

ERRORS_ENV_VAR = "CARCLF_ERRORS"
# Azure ML's inference server (`azmlinfsrv`, which runs Azure's no-code MLflow scoring script) answers any
# exception from predict with HTTP 500 and a fixed text, so there `errors=auto` means coerce: a bad photo is a
# row with an `error` text. It is recognised from inside: its package imports the entry script in this very
# process, and the server's image names that script in the environment. AZUREML_MODEL_DIR alone is not taken
# as a sign: Azure ML batch jobs set it too, where the job's own script, not a fixed 500, handles errors.
AZURE_SERVER_MODULE = "azureml_inference_server_http"
AZURE_SERVER_ENV_VAR = "AZUREML_ENTRY_SCRIPT"
# Request limits (memory a request may make the server hold): images per request and their encoded bytes.
MAX_IMAGES_ENV_VAR = "CARCLF_MAX_IMAGES_PER_REQUEST"
MAX_REQUEST_BYTES_ENV_VAR = "CARCLF_MAX_REQUEST_BYTES"
DEFAULT_MAX_IMAGES_PER_REQUEST = 1024
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024


def _is_missing(value) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    import pandas as pd

    return value is pd.NA or value is pd.NaT


def _as_int(value, column: str) -> int:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{column} must be an integer, got {value!r}")


_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")
_NOT_BASE64_CHARACTER = re.compile(r"[^A-Za-z0-9+/=]")
# What a request may look like, for the one-line answer to one that has no image column.
ACCEPTED_SHAPES = (
    'send an \'image\' column of base64 text: {"dataframe_split": {"columns": ["image"], "data": '
    '[["<base64>"]]}}, {"dataframe_records": [{"image": "<base64>"}]}, {"inputs": {"image": '
    '["<base64>"]}} or {"instances": [{"image": "<base64>"}]} (Azure: {"input_data": {"columns": '
    '["image"], "index": [0], "data": [["<base64>"]]}}), with optional bbox_x1, bbox_y1, bbox_x2, bbox_y2'
)


def _binascii_strict_b64decode(text, validate=True):
    return binascii.a2b_base64(text, strict_mode=True)


try:
    # SIMD base64 (a batch request is megabytes of it): 8 MB in 0.4 ms here, where binascii took 24 ms of the
    # request on one core. Only as strict as base64.b64decode(validate=True), or stricter (it refuses padding
    # followed by more '='), so what it refuses takes the checks below, which decide and name the problem.
    from pybase64 import b64decode as _strict_b64decode
except ImportError:  # a caller's own pip_requirements without it: the same answers, slower
    _strict_b64decode = _binascii_strict_b64decode


def decode_base64_image(text: str) -> bytes:
    """Base64 text -> bytes: MIME line breaks, surrounding whitespace and a ``data:...;base64,`` prefix allowed;
    anything else that is not base64 is refused naming the first bad character."""
    if text.isascii():
        # Fast path for what clients send, one line of base64: no copy without whitespace first.
        try:
            if decoded := _strict_b64decode(text, validate=True):
                return decoded
        except (binascii.Error, ValueError):
            pass
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError("image is a data: URI but not ';base64,' encoded")
    compact = "".join(text.split())
    if not compact:
        raise ValueError("empty image (0 bytes)")
    if compact.isascii():
        try:  # MIME line breaks (76 characters a line) or a data: URI
            return _strict_b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            pass
    if bad := _NOT_BASE64_CHARACTER.search(compact):
        raise ValueError(f"image is text but not base64: character {bad.group()!r} at position {bad.start()}")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image is text but not valid base64 ({exc})") from None


def _image_bytes(value):
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if isinstance(value, bytes):
        # Base64 text sent as bytes (a `binary` signature of a caller's own, or an in-process caller): no image
        # format is pure base64 text, since every one starts with a binary magic number.
        if len(value) >= 8 and _BASE64_TEXT.fullmatch(value):
            try:
                return decode_base64_image(value.decode("ascii"))
            except ValueError:
                return value
        return value
    if isinstance(value, str):
        return decode_base64_image(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value
    raise ValueError(f"image must be base64 text or encoded image bytes, got {type(value).__name__}")


def _limit_from(env_var: str, model_config: dict, key: str, default: int) -> int:
    raw = os.environ.get(env_var) or model_config.get(key) or default
    try:
        value = int(float(raw))
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        source = env_var if os.environ.get(env_var) else f"model_config {key}"
        raise ValueError(f"{source} must be a positive integer, got {raw!r}")
    return value


def azure_inference_server(env=None, modules=None) -> str | None:
    """What shows that this process is Azure ML's inference server, or None (``env``: default ``os.environ``,
    ``modules``: default ``sys.modules``)."""
    env = os.environ if env is None else env
    modules = sys.modules if modules is None else modules
    if AZURE_SERVER_MODULE in modules:
        return f"{AZURE_SERVER_MODULE} is loaded"
    if str(env.get(AZURE_SERVER_ENV_VAR, "")).strip():
        return f"{AZURE_SERVER_ENV_VAR} is set"
    return None


def _error_mode_from(model_config: dict, env=None, modules=None) -> tuple[str, str]:
    """(the default of the ``errors`` param, why): CARCLF_ERRORS, else model_config ``errors``, else auto, which
    is coerce under Azure's inference server and raise elsewhere."""
    env = os.environ if env is None else env
    if str(env.get(ERRORS_ENV_VAR, "")).strip():
        raw, source = env[ERRORS_ENV_VAR], ERRORS_ENV_VAR
    elif model_config.get("errors"):
        raw, source = model_config["errors"], "model_config errors"
    else:
        raw, source = AUTO_ERROR_MODE, "default errors"
    mode = str(raw).strip().lower()
    if mode not in ERROR_MODES + (AUTO_ERROR_MODE,):
        raise ValueError(f"{source} must be one of {', '.join(ERROR_MODES + (AUTO_ERROR_MODE,))}, got {mode!r}")
    if mode != AUTO_ERROR_MODE:
        return mode, f"{source}={mode}"
    server = azure_inference_server(env, modules)
    if server:
        return (
            "coerce",
            f"{source}=auto under Azure's inference server ({server}), which answers exceptions with HTTP 500",
        )
    return "raise", f"{source}=auto, not under Azure's inference server"


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the server; set per deployment (environment) or per load (model_config)."""

    max_images: int = DEFAULT_MAX_IMAGES_PER_REQUEST
    max_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # summed over the request's photos (carclf_flavor.budget)
    max_decoding_pixels: int = DEFAULT_MAX_DECODING_PIXELS  # decoding at once in this process, all requests
    default_errors: str = "raise"
    errors_reason: str = ""
    # Seconds before the server gives up on a request ($MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, which
    # `mlflow models serve` sets); predict stops working on it then (carclf_flavor.deadline). None: no deadline.
    timeout_s: float | None = None

    @classmethod
    def from_environment(cls, model_config: dict | None = None) -> RequestLimits:
        model_config = dict(model_config or {})
        default_errors, errors_reason = _error_mode_from(model_config)
        return cls(
            max_images=_limit_from(
                MAX_IMAGES_ENV_VAR, model_config, "max_images_per_request", DEFAULT_MAX_IMAGES_PER_REQUEST
            ),
            max_bytes=_limit_from(
                MAX_REQUEST_BYTES_ENV_VAR, model_config, "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES
            ),
            max_pixels=_limit_from(
                MAX_REQUEST_PIXELS_ENV_VAR, model_config, "max_request_pixels", DEFAULT_MAX_REQUEST_PIXELS
            ),
            max_decoding_pixels=_limit_from(
                MAX_DECODING_PIXELS_ENV_VAR, model_config, "max_decoding_pixels", DEFAULT_MAX_DECODING_PIXELS
            ),
            default_errors=default_errors,
            errors_reason=errors_reason,
            timeout_s=request_timeout_from_environment(),
        )


class _CarClassifierPyfunc:
    """pyfunc wrapper: DataFrame (image [+ bbox_x1..bbox_y2]) -> DataFrame (label, class_id, prob, top_k, error).

    params: ``top_k`` (default 5), ``errors`` ("raise": the first bad row fails the request with HTTP 400;
    "coerce": bad rows get label/class_id/prob null, top_k empty and an ``error`` text; good rows are scored;
    "auto", the default: ``RequestLimits.default_errors``), ``top_k_format`` ("json": top_k is JSON text, the
    signature's string column; "list": a nested list).
    """

    def __init__(self, classifier: CarClassifier, limits: RequestLimits | None = None):
        self.classifier = classifier
        self.limits = limits or RequestLimits()

    def get_raw_model(self):
        return self.classifier

    def _params(self, params):
        params = dict(params or {})
        top_k = params.get("top_k", DEFAULT_TOP_K)
        if isinstance(top_k, str):
            try:
                top_k = int(top_k)
            except ValueError:
                pass
        if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise invalid_input(f"params.top_k must be an integer >= 1, got {top_k!r}")
        errors = str(params.get("errors", AUTO_ERROR_MODE)).strip().lower()
        if errors == AUTO_ERROR_MODE:
            errors = self.limits.default_errors
        if errors not in ERROR_MODES:
            raise invalid_input(
                f"params.errors must be one of {', '.join(ERROR_MODES + (AUTO_ERROR_MODE,))}, "
                f"got {params.get('errors')!r}"
            )
        top_k_format = str(params.get("top_k_format", TOP_K_FORMATS[0])).strip().lower()
        if top_k_format not in TOP_K_FORMATS:
            raise invalid_input(
                f"params.top_k_format must be one of {', '.join(TOP_K_FORMATS)}, got {params.get('top_k_format')!r}"
            )
        return int(top_k), errors, top_k_format

    def _table(self, data):
        """The request as a DataFrame with an image column (checked), and its bbox values (or None)."""
        import pandas as pd

        if isinstance(data, dict):
            try:
                data = pd.DataFrame(data)
            except ValueError:
                data = pd.DataFrame([data])
        if not isinstance(data, pd.DataFrame):
            raise invalid_input(f"input is a {type(data).__name__}, not a table: {ACCEPTED_SHAPES}")
        if IMAGE_COLUMN not in data.columns:
            raise invalid_input(f"input has no '{IMAGE_COLUMN}' column: {ACCEPTED_SHAPES}")
        if len(data) == 1 and all(isinstance(v, (list, tuple, np.ndarray)) for v in data.iloc[0]):
            # `{"inputs": {"image": [...]}}` with only text lists reaches us as ONE row holding the lists
            # (MLflow's schema enforcement builds `DataFrame([inputs])` then): spread them back into rows.
            lengths = {len(v) for v in data.iloc[0]}
            if len(lengths) != 1:
                raise invalid_input(f"input columns have different lengths: {sorted(lengths)}")
            data = pd.DataFrame({column: list(values) for column, values in data.iloc[0].items()})
        if len(data) > self.limits.max_images:
            raise invalid_input(
                f"request has {len(data)} images, above the limit of {self.limits.max_images} per request "
                f"({MAX_IMAGES_ENV_VAR}); send smaller batches"
            )
        present = [c for c in BBOX_COLUMNS if c in data.columns]
        if present and len(present) != len(BBOX_COLUMNS):
            missing = [c for c in BBOX_COLUMNS if c not in data.columns]
            raise invalid_input(f"bbox columns must come together: missing {', '.join(missing)}")
        bbox_values = data[list(BBOX_COLUMNS)].to_numpy(dtype=object) if present else None
        return data, bbox_values

    def _read_rows(self, data, bbox_values, deadline: Deadline = NO_DEADLINE) -> list:
        """(photo header or array, bbox or None, problem or None) per row; the request limits raise.

        Every row is read (base64, then the photo's header: format, size, per-photo limit) before any photo is
        decoded, so that a request over its pixel budget is refused whole without decoding anything.
        """
        total_bytes = 0
        pixels = RequestPixels(self.limits.max_pixels)
        max_photo_pixels = self.classifier.settings.max_pixels
        rows = []
        for row, value in enumerate(data[IMAGE_COLUMN].tolist()):
            deadline.check(f"while reading row {row}")
            problem, image, bbox = None, None, None
            try:
                if _is_missing(value):
                    raise ValueError("image is missing (null)")
                image = _image_bytes(value)
                total_bytes += image.nbytes if isinstance(image, np.ndarray) else len(image)
                if total_bytes > self.limits.max_bytes:
                    raise invalid_input(
                        f"request's images add up to more than {self.limits.max_bytes} bytes by row {row} "
                        f"({MAX_REQUEST_BYTES_ENV_VAR}); send smaller batches"
                    )
                if isinstance(image, np.ndarray):
                    photo_pixels = image.shape[0] * image.shape[1] if image.ndim >= 2 else image.size
                else:
                    image = read_photo_header(image, max_photo_pixels)
                    photo_pixels = image.stored_size[0] * image.stored_size[1]
                try:
                    pixels.add(row, photo_pixels)
                except ValueError as exc:
                    raise invalid_input(str(exc)) from None
                if bbox_values is not None:
                    values = bbox_values[row]
                    missing = [c for c, v in zip(BBOX_COLUMNS, values) if _is_missing(v)]
                    if len(missing) == len(BBOX_COLUMNS):
                        bbox = None
                    elif missing:
                        raise ValueError(f"bbox is incomplete: {', '.join(missing)} missing")
                    else:
                        bbox = tuple(_as_int(v, c) for c, v in zip(BBOX_COLUMNS, values))
            except ValueError as exc:
                problem = str(exc)
            rows.append(((image if problem is None else b""), bbox, problem))
        return rows

    def predict(self, data, params: dict | None = None):
        from mlflow.exceptions import MlflowException

        try:
            return self._predict(data, params)
        except MlflowException:
            raise
        except DeadlinePassed as exc:
            # The server has answered 504 already: this line is for its log, the work is what it saves.
            _logger.warning("carclf predict: %s", exc)
            raise internal_error(str(exc)) from None
        except Exception as exc:
            # Whatever went wrong, the client gets one line (MLflow's own handler would put the stack trace in
            # the answer's body); the server's log gets the whole of it.
            _logger.exception("carclf predict failed")
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise internal_error(
                f"internal error in the carclf model ({type(exc).__name__}: {first_line}); the server log has "
                "the details"
            ) from None

    def _predict(self, data, params):
        import pandas as pd

        deadline = Deadline(self.limits.timeout_s)
        top_k, errors, top_k_format = self._params(params)
        table, bbox_values = self._table(data)
        # Rows already bad are not decoded; the rest go through the same preprocessing as the training data,
        # decoded while the network runs on the rows before them.
        results, problems = self.classifier.classify_rows(
            self._read_rows(table, bbox_values, deadline), top_k, stop_at_problem=errors == "raise", deadline=deadline
        )
        if errors == "raise" and (
            message := first_problem_message(problems, "row", "; params errors=coerce scores the good ones")
        ):
            raise invalid_input(message)
        records = []
        for record, problem in zip(results, problems):
            if problem is None:
                record[ERROR_COLUMN] = None
            else:
                # top_k is empty, not null: spark_udf cannot convert a null array inside its struct (the list
                # form), and both forms keep one rule for readers: an empty top_k is a bad row.
                record = dict(dict.fromkeys(OUTPUT_COLUMNS), top_k=[])
                record[ERROR_COLUMN] = problem
            if top_k_format == "json":
                record["top_k"] = top_k_as_json(record["top_k"])
            records.append(record)
        # Every answer has the signature's columns (spark_udf builds its struct from them), `error` included.
        columns = [*OUTPUT_COLUMNS, ERROR_COLUMN]
        if errors == "coerce":
            # object columns keep None (JSON null) for bad rows instead of NaN.
            return pd.DataFrame({c: pd.Series([r[c] for r in records], dtype=object) for c in columns})
        if not records:
            return pd.DataFrame(columns=columns)
        frame = pd.DataFrame.from_records(records, columns=columns)
        frame[ERROR_COLUMN] = pd.Series([None] * len(frame), dtype=object)
        return frame
