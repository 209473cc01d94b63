"""The REST client of a served carclf model: `mlflow models serve` (``/invocations``) or an Azure ML managed
online endpoint (its scoring URI, key auth), with the request body each expects and one-line refusals."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
from collections.abc import Sequence

from carclf.scoring.errors import ScoringError
from carclf_flavor.signature import top_k_entries


def build_request(images: Sequence[bytes], bboxes: Sequence | None = None, top_k: int = 5, azure: bool = False) -> dict:
    """The JSON body: base64 images (+ bbox columns) and the top_k parameter, as a pandas split frame under
    `dataframe_split` (mlflow models serve) or `input_data` with its index (Azure ML's scoring script)."""
    columns = ["image"]
    rows = [[base64.b64encode(data).decode("ascii")] for data in images]
    if bboxes is not None and any(b is not None for b in bboxes):
        columns += ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
        for row, bbox in zip(rows, bboxes):
            row.extend(list(bbox) if bbox is not None else [None] * 4)
    params = {"top_k": int(top_k)}
    if azure:
        return {"input_data": {"columns": columns, "index": list(range(len(rows))), "data": rows}, "params": params}
    return {"dataframe_split": {"columns": columns, "data": rows}, "params": params}


def _server_message(response) -> str:
    try:
        body = response.json()
        return str(body.get("message", body))
    except ValueError:
        return response.text.strip()[:500]


def post_invocations(url: str, body: dict, timeout: float = 120.0) -> list[dict]:
    """POST one request; returns the list of predictions or raises ScoringError with the server's message."""
    import requests

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/invocations"):
        endpoint += "/invocations"
    try:
        response = requests.post(
            endpoint, data=json.dumps(body), timeout=timeout, headers={"Content-Type": "application/json"}
        )
    except requests.exceptions.ConnectionError:
        raise ScoringError(f"cannot connect to {endpoint} (is `mlflow models serve` running there?)") from None
    except requests.exceptions.Timeout:
        raise ScoringError(f"{endpoint} did not answer within {timeout:.0f} s") from None
    if response.status_code != 200:
        raise ScoringError(f"the server refused the request (HTTP {response.status_code}): {_server_message(response)}")
    return response.json()["predictions"]


def post_azure(
    endpoint: str, body: dict, key: str, deployment: str | None = None, timeout: float = 120.0
) -> list[dict]:
    """POST one request to an Azure ML online endpoint's scoring URI; returns one dict per row."""
    import requests

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    if deployment:
        headers["azureml-model-deployment"] = deployment
    target = f"{endpoint} (deployment {deployment})" if deployment else endpoint
    try:
        response = requests.post(endpoint, data=json.dumps(body), timeout=timeout, headers=headers)
    except requests.exceptions.ConnectionError:
        raise ScoringError(f"cannot connect to {target}: check --azure-endpoint (the endpoint's scoring URI)") from None
    except requests.exceptions.Timeout:
        raise ScoringError(f"{target} did not answer within {timeout:.0f} s") from None
    if response.status_code in (401, 403):
        raise ScoringError(
            f"{target} refused the key (HTTP {response.status_code}): check --key or "
            "AZUREML_ENDPOINT_KEY (az ml online-endpoint get-credentials -n <endpoint>)"
        )
    if response.status_code != 200:
        hint = ""
        if response.status_code >= 500:
            # Azure's scoring script answers any exception with a fixed text; the cause is in the log.
            hint = (
                " (the cause is in the deployment log: az ml online-deployment get-logs -e <endpoint> -n <deployment>)"
            )
        message = " ".join(_server_message(response).split())[:500]
        raise ScoringError(f"the endpoint refused the request (HTTP {response.status_code}): {message}{hint}")
    try:
        answer = response.json()
    except ValueError:
        raise ScoringError(
            f"{target} answered HTTP 200 with a body that is not JSON: {response.text[:200]!r}"
        ) from None
    if isinstance(answer, str):  # some inference servers JSON-encode the scoring script's JSON once more
        answer = json.loads(answer)
    if isinstance(answer, dict) and "predictions" in answer:
        answer = answer["predictions"]
    if not isinstance(answer, list) or not all(isinstance(row, dict) for row in answer):
        raise ScoringError(f"{target} answered with {type(answer).__name__}, not one record per photo")
    return answer


def score_files(
    url: str,
    paths: Sequence[os.PathLike | str],
    top_k: int = 5,
    bbox=None,
    batch_size: int = 16,
    timeout: float = 120.0,
    azure_key: str | None = None,
    deployment: str | None = None,
) -> list[dict]:
    """Score image files through the REST endpoint, ``batch_size`` per request; one dict per file.
    With ``azure_key``, ``url`` is an Azure ML online endpoint's scoring URI."""
    if batch_size < 1:
        raise ScoringError(f"--batch-size must be >= 1, got {batch_size}")
    paths = [pathlib.Path(p) for p in paths]
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = []
        for path in chunk:
            try:
                images.append(path.read_bytes())
            except OSError as exc:
                raise ScoringError(f"{path}: cannot read ({exc.strerror or exc})") from None
        body = build_request(images, [bbox] * len(chunk) if bbox else None, top_k, azure=azure_key is not None)
        try:
            if azure_key is not None:
                predictions = post_azure(url, body, azure_key, deployment, timeout=timeout)
            else:
                predictions = post_invocations(url, body, timeout=timeout)
        except ScoringError as exc:
            # The server names rows of this request: name the file instead.
            message = re.sub(
                r"\brow (\d+):",
                lambda m, chunk=chunk: f"{chunk[int(m.group(1))]}:" if int(m.group(1)) < len(chunk) else m.group(0),
                str(exc),
            )
            raise ScoringError(message) from None
        if len(predictions) != len(chunk):
            raise ScoringError(f"{url} answered {len(predictions)} predictions for {len(chunk)} photos")
        for path, prediction in zip(chunk, predictions):
            # JSON text from models with an output schema, a nested list from older ones: a list either way.
            prediction["top_k"] = top_k_entries(prediction.get("top_k"))
            results.append(dict(file=str(path), **prediction))
    return results
