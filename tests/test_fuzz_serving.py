"""Fuzzing a real `mlflow models serve -w 1` of a tiny carclf model on 127.0.0.1.

A seeded generator makes a few hundred hostile or odd requests: random bytes, non-UTF-8 bodies, truncated,
corrupt and bombed images of every format, wrong JSON shapes and types, every request format MLflow's server
accepts, bad params, huge batches. Every answer must be 200, or a 4xx whose message is ONE line that does not
repeat the request; a 5xx is allowed only where MLflow's server answers before the model runs and carclf
cannot change it (documented in the README's troubleshooting: a body that is not UTF-8). The server must stay
up and its worker's peak RSS must stay under a bound (see RSS_RISE_BOUND_MB).
"""

from __future__ import annotations

import base64
import io
import json
import random
import time

import pytest
import requests
from PIL import Image

import carclf_flavor
from carclf.deployment.local_server import LocalServer, ServerStartError
from carclf_flavor.images import PreprocessSettings
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes, varied_format_images
from helpers_hostile import PeakRSS, bomb_png, header_bombs, process_tree

SEED = 14
NUM_RANDOM_CASES = 260
TIME_BUDGET_S = 60.0  # the requests themselves; the server start is extra
# Bound on the rise of the worker's peak RSS over the whole fuzz run, after a warm-up with ordinary photos.
# Justification: the largest body sent is ~4 MB of JSON (the 20000x20000 PNG bomb, 1.2 MB, base64); MLflow's
# parsing holds a few copies of it (bytes, str, parsed JSON, DataFrame, decoded bytes: < 40 MB); the biggest
# batch (1000 tiny JPEGs) is ~1 MB of photos, but the network's activations for 1000 images at 32 px are
# ~70 MB (measured: a 3000-image batch raised the peak by ~200 MB in all). Decoding any one bomb instead would
# cost >= 768 MB (16000x16000 RGB) or 1.2 GB (20000x20000): 300 MB catches every one of them and leaves room
# for the allocator's own slack.
RSS_RISE_BOUND_MB = 300
MAX_MESSAGE_CHARS = 600  # a one-line reason; the bodies sent are much longer, so a repeated request fails it

GOOD = jpeg_bytes(90, 70, seed=1)

# Answers MLflow's scoring server gives BEFORE the model runs (mlflow/pyfunc/scoring_server: the body's
# decoding and its top-level shape), which no model code can change; each is listed with its exact request in
# the README's troubleshooting. (status, start of the message); status 500 only for a body that is not UTF-8.
MLFLOW_PARAMS_CHECK = "Error: Invalid parameters found: {("
MLFLOW_OWN_ANSWERS = [
    (400, "Invalid input. Ensure that input is a valid JSON formatted string."),
    (400, "The input must be a JSON dictionary with exactly one of the input fields"),
    (415, "This predictor only supports the following content types"),
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def split_body(values, columns=("image",), params=None) -> dict:
    body = {"dataframe_split": {"columns": list(columns), "data": [[v] if len(columns) == 1 else v for v in values]}}
    if params is not None:
        body["params"] = params
    return body


# ------------------------------------------------------------------------------------------ the generator
class Case:
    def __init__(
        self,
        name: str,
        body: bytes,
        content_type: str = "application/json",
        expect: str = "any",
        mlflow_5xx: bool = False,
    ):
        self.name, self.body, self.content_type, self.expect, self.mlflow_5xx = (
            name,
            body,
            content_type,
            expect,
            mlflow_5xx,
        )


def _json(name, obj, expect="any") -> Case:
    return Case(name, json.dumps(obj).encode(), expect=expect)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _truncated(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randint(1, max(1, len(data) - 1))]


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 20)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def fixed_cases() -> list[Case]:
    """One of each kind that must hold exactly (status class given where the target behaviour is known)."""
    good = b64(GOOD)
    cases = [
        _json("valid dataframe_split", split_body([good]), "200"),
        _json("valid dataframe_records", {"dataframe_records": [{"image": good}]}, "200"),
        _json("valid inputs as dict of columns", {"inputs": {"image": [good]}}, "200"),
        _json("valid instances", {"instances": [{"image": good}]}, "200"),
        _json("bare list without column names", {"inputs": [good]}, "4xx"),
        _json("params.top_k not a number", split_body([good], params={"top_k": "abc"}), "4xx"),
        _json("params.top_k negative", split_body([good], params={"top_k": -3}), "4xx"),
        _json("params.errors unknown", split_body([good], params={"errors": "ignore"}), "4xx"),
        _json("unknown param", split_body([good], params={"topk": 3}), "any"),
        _json("wrong column name", split_body([good], columns=("photo",)), "4xx"),
        _json("1,000 ! characters as the image", split_body(["!" * 1000]), "4xx"),
        _json("empty image string", split_body([""]), "4xx"),
        _json("image is a number", split_body([12345]), "4xx"),
        _json("image is null", split_body([None]), "4xx"),
        _json("image is a list", split_body([[1, 2, 3]]), "4xx"),
        _json("image is a dict", split_body([{"a": 1}]), "4xx"),
        _json("not base64 text", split_body(["this is not base64 at all %%%"]), "4xx"),
        _json("base64 of text", split_body([b64(b"hello world, no photo here" * 10)]), "4xx"),
        _json("MIME base64 with line breaks", split_body([base64.encodebytes(GOOD).decode("ascii")]), "200"),
        _json(
            "bbox strings",
            {
                "dataframe_split": {
                    "columns": ["image", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"],
                    "data": [[good, "a", "b", "c", "d"]],
                }
            },
            "4xx",
        ),
        _json(
            "bbox inverted",
            {
                "dataframe_split": {
                    "columns": ["image", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"],
                    "data": [[good, 50, 50, 10, 10]],
                }
            },
            "4xx",
        ),
        _json("no rows", split_body([]), "any"),
        _json("empty object", {}, "4xx"),
        _json("JSON null", None, "4xx"),
        _json("JSON number", 7, "4xx"),
        _json("JSON string", "image", "4xx"),
        _json("JSON list of lists", [[good]], "4xx"),
        _json("dataframe_split is a number", {"dataframe_split": 5}, "4xx"),
        _json("dataframe_split data is a string", {"dataframe_split": {"columns": ["image"], "data": "x"}}, "4xx"),
        _json(
            "two formats at once",
            {"dataframe_split": split_body([good])["dataframe_split"], "instances": [{"image": good}]},
            "4xx",
        ),
        Case("empty body", b"", expect="4xx"),
        Case("truncated JSON", json.dumps(split_body([good])).encode()[:50], expect="4xx"),
        # MLflow's json.loads hits Python's recursion limit before the model runs: its own 500 (README).
        Case("deeply nested JSON", b"[" * 5000 + b"]" * 5000, mlflow_5xx=True),
        Case("non-UTF-8 body", b"\xff\xfe\xfa" + json.dumps(split_body([good])).encode(), mlflow_5xx=True),
        Case("latin-1 JSON", json.dumps({"inputs": {"image": ["caf\u00e9"]}}).encode("latin-1"), mlflow_5xx=True),
        Case("text/plain content type", json.dumps(split_body([good])).encode(), "text/plain", "4xx"),
        Case("CSV with a photo", f"image\n{good}\n".encode(), "text/csv", "any"),
        Case("CSV garbage", b'a,b,c\n1,2\n"unclosed', "text/csv", "4xx"),
        _json("20000x20000 PNG bomb", split_body([b64(bomb_png(20000, 20000))]), "4xx"),
        _json("good photo beside a bomb", split_body([good, b64(bomb_png(20000, 20000))]), "4xx"),
        _json(
            "bomb with errors=coerce",
            split_body([good, b64(bomb_png(20000, 20000))], params={"errors": "coerce"}),
            "200",
        ),
        _json("huge batch of tiny photos", split_body([b64(jpeg_bytes(40, 30, seed=2))] * 1000), "any"),
    ]
    for name, data in header_bombs(16000, 16000).items():
        cases.append(_json(f"{name} header bomb 16000x16000", split_body([b64(data)]), "4xx"))
    for name, data in header_bombs(9000, 7000).items():
        cases.append(_json(f"{name} header bomb 9000x7000", split_body([b64(data)]), "4xx"))
    for name, data in varied_format_images().items():
        cases.append(_json(f"valid {name}", split_body([b64(data)]), "200"))
    return cases


def random_cases(rng: random.Random, count: int) -> list[Case]:
    photos = [GOOD, *varied_format_images().values()]
    for fmt in ("PNG", "GIF", "BMP", "TIFF", "AVIF", "JPEG2000"):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, fmt)
        photos.append(buffer.getvalue())
    out = []
    for i in range(count):
        kind = rng.choice(
            ["random_bytes", "random_text", "truncated", "corrupt", "random_b64", "shape", "params", "batch"]
        )
        if kind == "random_bytes":
            data = rng.randbytes(rng.randint(1, 4000))
            out.append(Case(f"{i} random bytes", data, mlflow_5xx=not _is_utf8(data)))
        elif kind == "random_text":
            text = "".join(rng.choice('{}[]":,abc0123 \n\\') for _ in range(rng.randint(1, 300)))
            out.append(Case(f"{i} random JSON-ish text", text.encode()))
        elif kind in ("truncated", "corrupt"):
            photo = rng.choice(photos)
            data = _truncated(photo, rng) if kind == "truncated" else _corrupt(photo, rng)
            out.append(_json(f"{i} {kind} photo", split_body([b64(data)])))
        elif kind == "random_b64":
            out.append(_json(f"{i} base64 of random bytes", split_body([b64(rng.randbytes(rng.randint(0, 3000)))])))
        elif kind == "shape":
            value = rng.choice(
                [
                    None,
                    0,
                    -1,
                    1.5,
                    True,
                    "x",
                    [],
                    {},
                    [None],
                    {"image": None},
                    [[b64(GOOD)]],
                    {"columns": ["image"]},
                    {"data": [[b64(GOOD)]]},
                ]
            )
            key = rng.choice(["dataframe_split", "dataframe_records", "inputs", "instances", "data", "image"])
            out.append(_json(f"{i} {key}={json.dumps(value)[:30]}", {key: value}))
        elif kind == "params":
            value = rng.choice(["abc", -1, 0, 10**12, 2.5, None, [], {}, "3", True])
            key = rng.choice(["top_k", "errors"])
            out.append(_json(f"{i} params.{key}={value!r}", split_body([b64(GOOD)], params={key: value})))
        else:
            size = rng.choice([0, 1, 7, 64, 257])
            values = [
                b64(rng.choice(photos)) if rng.random() < 0.8 else rng.choice(["", "!!", None, 3]) for _ in range(size)
            ]
            out.append(_json(f"{i} batch of {size}, some bad", split_body(values, params={"errors": "coerce"})))
    return out


# ----------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    model_dir = work / "model"
    carclf_flavor.save_model(
        build_tiny_resnet(seed=4),
        model_dir,
        CLASS_NAMES,
        preprocessing=PreprocessSettings(image_size=IMAGE_SIZE, crop="bbox", crop_margin=4),
        inference_precision="float32",
    )
    log_path = work / "server.log"
    try:
        served = LocalServer(
            model_dir,
            log_path,
            env={"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"},
            cwd=work,
            startup_timeout_s=240,
        )
    except ServerStartError as exc:
        pytest.fail(f"mlflow models serve did not start: {exc}", pytrace=False)
    with served:
        yield {"url": served.url, "process": served.process, "log": log_path}


def _problem(case: Case, response: requests.Response) -> str | None:
    """None when the answer is acceptable, else what is wrong with it."""
    status = response.status_code
    if case.expect == "200" and status != 200:
        return f"expected 200, got {status}: {response.text[:300]}"
    if case.expect == "4xx" and not 400 <= status < 500:
        return f"expected a 4xx, got {status}: {response.text[:300]}"
    if status >= 500:
        return None if case.mlflow_5xx else f"HTTP {status}: {response.text[:300]}"
    if status == 200:
        return None
    if not 400 <= status < 500:
        return f"HTTP {status}"
    try:
        message = response.json().get("message", "")
    except ValueError:
        message = response.text
    if any(status == code and message.startswith(start) for code, start in MLFLOW_OWN_ANSWERS):
        return None
    if status == 400 and message.startswith("Failed to predict data") and MLFLOW_PARAMS_CHECK in message:
        # MLflow checks params against the signature's ParamSchema inside PyFuncModel.predict, before carclf's
        # code runs, and its server prefixes the request's repr; a ParamSpec can only be a plain type, so a
        # top_k of "abc" or an errors of 0 cannot reach carclf (README troubleshooting lists the answer).
        return None
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"HTTP {status} with a body that is not JSON: {response.text[:200]!r}"
    if not isinstance(message, str) or not message.strip():
        return f"HTTP {status} without a message: {response.text[:200]!r}"
    if "\n" in message.strip():
        return f"HTTP {status} message of {len(message.strip().splitlines())} lines: {message[:300]!r}"
    if len(message) > MAX_MESSAGE_CHARS:
        return f"HTTP {status} message of {len(message)} characters (repeats the request?): {message[:200]!r}"
    return None


def test_hostile_requests_get_200_or_one_line(fuzz_server):
    rng = random.Random(SEED)
    cases = fixed_cases() + random_cases(rng, NUM_RANDOM_CASES)
    rng.shuffle(cases)
    url = fuzz_server["url"] + "/invocations"
    worker = max(process_tree(fuzz_server["process"].pid), key=lambda pid: PeakRSS(pid).rss_mb())
    for _ in range(3):  # warm-up: first-call allocations of an ordinary request
        assert (
            requests.post(
                url, data=json.dumps(split_body([b64(GOOD)])), headers={"Content-Type": "application/json"}, timeout=60
            ).status_code
            == 200
        )
    problems, began, previous = [], time.monotonic(), "(none)"
    with PeakRSS(worker) as peak:
        for case in cases:
            if time.monotonic() - began > TIME_BUDGET_S:
                pytest.fail(f"fuzzing took over {TIME_BUDGET_S:g} s; reached case {case.name!r}")
            try:
                # A new connection per request: a keep-alive connection the server has just closed would
                # make an answer go missing for reasons that have nothing to do with the request.
                response = requests.post(url, data=case.body, headers={"Content-Type": case.content_type}, timeout=60)
            except requests.RequestException as exc:
                problems.append(f"{case.name}: no answer ({exc}); the request before: {previous}")
                if fuzz_server["process"].poll() is not None:
                    break
                continue
            finally:
                previous = case.name
            problem = _problem(case, response)
            if problem:
                problems.append(f"{case.name}: {problem}")
    print(
        f"fuzz: {len(cases)} requests in {time.monotonic() - began:.1f} s, {len(problems)} wrong; worker peak "
        f"RSS {peak.start_mb:.0f} MB + {peak.rise_mb:.0f} MB (bound + {RSS_RISE_BOUND_MB} MB)"
    )
    log_tail = fuzz_server["log"].read_text()[-3000:]
    assert fuzz_server["process"].poll() is None, f"the server died:\n{log_tail}"
    assert requests.get(fuzz_server["url"] + "/ping", timeout=5).status_code == 200
    assert peak.rise_mb < RSS_RISE_BOUND_MB, f"worker peak RSS rose by {peak.rise_mb:.0f} MB"
    assert not problems, (
        f"{len(problems)} of {len(cases)} answers wrong:\n"
        + "\n".join(sorted(problems))
        + f"\nserver log (tail):\n{log_tail}"
    )
