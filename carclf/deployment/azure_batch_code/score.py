"""Azure ML batch scoring script for a carclf model: `init()` once per worker, `run(mini_batch)` per mini-batch.

This folder is the batch deployment's code (``code_configuration``); Azure runs it in an environment built
from the model's own requirements plus Azure's batch runtime, so it imports only the standard library, pandas
and MLflow: never ``carclf``, which is not installed there. The model is loaded with MLflow's pyfunc loader, so
a photo goes through exactly the preparation and network of online serving (carclf_flavor's predict).

``run`` returns one CSV line per file (columns ``COLUMNS``, no header): with ``output_action: append_row``
Azure appends them to the output file, which is then a plain CSV even though labels contain spaces and top_k
is JSON text (a returned DataFrame would be written space-separated, which these values cannot survive).
A file that cannot be read or decoded is a row whose ``error`` names it; a mini-batch never fails for a photo.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import pathlib

COLUMNS = ("file", "label", "class_id", "prob", "top_k", "error")
# Files per predict call and their bytes: under the flavor's per-request limits (1024 images, 64 MiB), so a
# large mini_batch_size is split instead of refused.
CHUNK_FILES = 64
CHUNK_BYTES = 32 * 1024 * 1024

log = logging.getLogger("carclf.batch")
model = None


def find_model_dir(root: str | os.PathLike) -> pathlib.Path:
    """The MLflow model folder under AZUREML_MODEL_DIR: the folder itself or the one sub-folder with an MLmodel
    (Azure mounts a registered MLflow model as <AZUREML_MODEL_DIR>/<artifact folder>/MLmodel)."""
    root = pathlib.Path(root)
    if (root / "MLmodel").is_file():
        return root
    found = sorted(path.parent for path in root.glob("*/MLmodel"))
    if len(found) != 1:
        raise RuntimeError(
            f"AZUREML_MODEL_DIR {str(root)!r}: expected one MLflow model (a folder with an MLmodel file), "
            f"found {len(found)}"
        )
    return found[0]


def init() -> None:
    global model
    import mlflow.pyfunc

    root = os.environ.get("AZUREML_MODEL_DIR")
    if not root:
        raise RuntimeError("AZUREML_MODEL_DIR is not set: this script runs inside an Azure ML batch deployment")
    model = mlflow.pyfunc.load_model(str(find_model_dir(root)))


def _row(file: str, answer: dict | None = None, error: str | None = None) -> dict:
    answer = answer or {}
    row = {"file": file, **{key: answer.get(key) for key in COLUMNS[1:-1]}, "error": error or answer.get("error")}
    return {key: (None if value != value else value) for key, value in row.items()}  # NaN -> empty


def _predict(names: list[str], photos: list[bytes]) -> list[dict]:
    import pandas as pd

    # errors="coerce" explicitly: errors=auto means raise outside Azure's online server, and this is a batch job.
    answer = model.predict(pd.DataFrame({"image": photos}), params={"errors": "coerce"})
    records = answer.to_dict(orient="records") if hasattr(answer, "to_dict") else list(answer)
    return [_row(name, record) for name, record in zip(names, records, strict=True)]


def _score_chunk(names: list[str], photos: list[bytes]) -> list[dict]:
    try:
        return _predict(names, photos)
    except Exception as exc:  # one photo that coerce does not cover must not fail the others: one by one
        log.warning("scoring %d files together failed (%s); scoring them one by one", len(names), exc)
    rows = []
    for name, photo in zip(names, photos, strict=True):
        try:
            rows.extend(_predict([name], [photo]))
        except Exception as exc:
            rows.append(
                _row(name, error=f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            )
    return rows


def score_files(paths) -> list[dict]:
    """One row (a dict of COLUMNS) per path, in order."""
    if model is None:
        raise RuntimeError("init() was not called")
    rows: list[dict | None] = []
    pending: list[tuple[int, str, bytes]] = []
    pending_bytes = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            scored = _score_chunk([p[1] for p in pending], [p[2] for p in pending])
            for (index, _, _), row in zip(pending, scored, strict=True):
                rows[index] = row
        pending, pending_bytes = [], 0

    for path in paths:
        name = os.path.basename(os.fspath(path))
        rows.append(None)
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError as exc:
            rows[-1] = _row(name, error=f"{name}: cannot read ({exc.strerror or exc})")
            continue
        if pending and (len(pending) >= CHUNK_FILES or pending_bytes + len(data) > CHUNK_BYTES):
            flush()
        pending.append((len(rows) - 1, name, data))
        pending_bytes += len(data)
    flush()
    return rows


def to_csv_line(row: dict) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(["" if row[key] is None else row[key] for key in COLUMNS])
    return buffer.getvalue()


def run(mini_batch) -> list[str]:
    return [to_csv_line(row) for row in score_files(list(mini_batch))]
