"""The demo web app: a page where a person drops car photos and sees the model's top 5 and where it looked.

``create_app(classifier, card, ...)`` returns a Starlette app (Starlette and uvicorn come with MLflow; no
other web framework, no CDN: the page is plain HTML/CSS/JS from ``demo_static/``, served by the app itself):

- ``GET /``: the page; ``GET /static/...``: its script and style sheet.
- ``GET /api/info``: model name, version, URI, classes, inference precision, input size, crop mode and the
  upload limits (the page shows them and checks sizes and counts before uploading).
- ``POST /api/predict?name=<file name>[&x1=..&y1=..&x2=..&y2=..]``: the body is one photo's bytes (any format
  the flavor reads); the optional box is in source pixels, exactly the REST columns ``bbox_x1..bbox_y2``. The
  answer: ``label``, ``class_id``, ``prob``, ``top_k`` (as the REST API gives them), ``classify_ms`` (decode +
  preprocess + network), ``heatmap_ms``, ``heatmap`` (a JPEG data URL: the Grad-CAM of the top class over the
  part of the photo the network saw) and ``region`` (that part, in source pixels). A bad photo is an HTTP
  400 (413 when too large) with ``{"error": "<file>: <one line>"}``; nothing a request sends stops the server.
  The served model's pixel budgets hold here too (``carclf_flavor.budget``, read from the same environment
  variables): a photo above the per-request budget is a 413 before it is decoded, decodes share the process's
  budget, and at most ``max_concurrent_predictions`` photos are analysed at once (the others wait their turn).
- ``GET /ping``: 200 once the model is loaded (the app is only built after loading it).

Photos are classified through ``CarClassifier.preprocess`` and ``predict_pixels``, the same two calls the
served pyfunc makes, so the page's answer is the REST answer for the same bytes and box.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import pathlib
import time

import numpy as np

log = logging.getLogger(__name__)

STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_FILES = 20
# Photos analysed at once; the rest wait. Each one holds its decoded photo, the network's activations and the
# Grad-CAM's gradients: unbounded, 20 parallel uploads of a 7000x7000 PNG took the server to 5.9 GB.
DEFAULT_MAX_CONCURRENT_PREDICTIONS = 2
TOP_K = 5
# The heatmap picture's longest side: enough to see the car, small enough to send back as a data URL.
HEATMAP_DISPLAY_PX = 480
_BBOX_PARAMS = ("x1", "y1", "x2", "y2")
# Past the limit the rest of an upload is read and dropped (so the browser gets the 413 instead of a reset
# connection), but only up to this much; a larger body is cut off.
_DRAIN_LIMIT_BYTES = 256 * 1024 * 1024


class PhotoError(ValueError):
    """One upload that cannot be classified (not an image, bad box, ...); the message says why."""


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What the page says about the model: where it came from, by name and version when registered."""

    uri: str
    name: str
    version: str
    source_run: str | None = None


def describe_model(model_uri: str) -> ModelCard:
    """Name and version of ``model_uri``: models:/name/version, models:/name@alias (resolved through the
    registry), runs:/<run>/<path> or a local path."""
    uri = str(model_uri)
    source_run = None
    try:
        import mlflow

        source_run = mlflow.models.get_model_info(uri).run_id
    except Exception as exc:  # the page still works without lineage
        log.debug("no model info for %s: %s", uri, exc)
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :].strip("/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = f"@{alias}"
            try:
                import mlflow

                version = f"{mlflow.MlflowClient().get_model_version_by_alias(name, alias).version} (@{alias})"
            except Exception as exc:
                log.debug("cannot resolve alias %s: %s", uri, exc)
            return ModelCard(uri, name, version, source_run)
        name, _, version = rest.partition("/")
        return ModelCard(uri, name, version or "latest", source_run)
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/") :].strip("/").partition("/")
        return ModelCard(uri, path or "model", f"run {run_id[:8]}", source_run or run_id)
    return ModelCard(uri, pathlib.Path(uri.rstrip("/")).name or uri, "unregistered", source_run)


def _bbox_from_query(params) -> tuple[int, int, int, int] | None:
    given = [name for name in _BBOX_PARAMS if params.get(name) not in (None, "")]
    if not given:
        return None
    if len(given) != len(_BBOX_PARAMS):
        missing = [name for name in _BBOX_PARAMS if name not in given]
        raise PhotoError(f"box is incomplete: {', '.join(missing)} missing")
    values = []
    for name in _BBOX_PARAMS:
        try:
            number = float(params[name])
        except ValueError:
            raise PhotoError(f"box {name} must be an integer, got {params[name]!r}") from None
        if not number.is_integer():
            raise PhotoError(f"box {name} must be an integer, got {params[name]!r}")
        values.append(int(number))
    return tuple(values)


def _megabytes(count: int) -> str:
    return f"{count / (1024 * 1024):.1f} MB"


class PhotoAnalyser:
    """Classifies one photo and draws its heatmap; thread-safe (the app calls it from a thread pool)."""

    def __init__(self, classifier, top_k: int = TOP_K):
        from carclf.reporting.gradcam import GradCAM

        self.classifier = classifier
        self.top_k = int(top_k)
        self.gradcam = GradCAM(classifier.model)
        size = int(classifier.settings.image_size)
        self.gradcam(np.zeros((1, size, size, 3), np.uint8), [0])  # trace now, not inside the first request

    def analyse(self, data: bytes, bbox) -> dict:
        classifier = self.classifier
        start = time.perf_counter()
        pixels, problems = classifier.preprocess([data], [bbox])
        if problems[0] is not None:
            raise PhotoError(problems[0])
        # The ranking the served pyfunc uses, so labels and probabilities match the REST answer.
        (answer,) = classifier.classify_pixels(pixels, self.top_k)
        classify_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        heatmap = self.gradcam(pixels, [answer["class_id"]])[0]
        picture, region = self._heatmap_picture(data, bbox, heatmap)
        heatmap_ms = (time.perf_counter() - start) * 1000
        return dict(
            answer,
            classify_ms=round(classify_ms, 1),
            heatmap_ms=round(heatmap_ms, 1),
            heatmap=picture,
            region=list(region),
            bbox=list(bbox) if bbox else None,
            heatmap_layer=self.gradcam.layer_name,
            heatmap_cells=list(self.gradcam.map_size),
        )

    def _heatmap_picture(self, data: bytes, bbox, heatmap: np.ndarray) -> tuple[str, tuple[int, int, int, int]]:
        """The Grad-CAM over the region of the photo that the network saw (crop + margin), as a JPEG data URL."""
        import cv2

        from carclf.reporting.gradcam import heatmap_to_region, overlay_heatmap
        from carclf_flavor.budget import PROCESS_DECODING
        from carclf_flavor.images import crop_region, decode_region, read_photo_header

        # The network's region (the flavor's bbox policy), decoded again at display size rather than at the
        # network's input size.
        settings = self.classifier.settings
        header = read_photo_header(data, settings.max_pixels)
        x1, y1, x2, y2 = crop_region(bbox, *header.size, settings)
        region = decode_region(header, (x1, y1, x2, y2), HEATMAP_DISPLAY_PX, decoding=PROCESS_DECODING)
        scale = min(1.0, HEATMAP_DISPLAY_PX / max(region.shape[:2]))
        shown_w, shown_h = max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale))
        if (shown_w, shown_h) != (region.shape[1], region.shape[0]):
            region = cv2.resize(region, (shown_w, shown_h), interpolation=cv2.INTER_AREA)
        overlay = overlay_heatmap(region, heatmap_to_region(heatmap, shown_w, shown_h, settings.resize_mode))
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(overlay[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 88])
        if not ok:
            raise RuntimeError("cannot encode the heatmap as JPEG")
        return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii"), (x1, y1, x2, y2)


def create_app(
    classifier,
    card: ModelCard,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    top_k: int = TOP_K,
    max_concurrent_predictions: int = DEFAULT_MAX_CONCURRENT_PREDICTIONS,
):
    """The Starlette app serving the page for a loaded ``CarClassifier``; the pixel budgets come from the
    environment as for the served model (``carclf_flavor.pyfunc.RequestLimits``)."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    if int(max_upload_bytes) < 1:
        raise ValueError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
    if int(max_files) < 1:
        raise ValueError(f"max_files must be >= 1, got {max_files}")
    if int(max_concurrent_predictions) < 1:
        raise ValueError(f"max_concurrent_predictions must be >= 1, got {max_concurrent_predictions}")
    max_upload_bytes, max_files = int(max_upload_bytes), int(max_files)
    from carclf_flavor.budget import PROCESS_DECODING, RequestPixels
    from carclf_flavor.images import read_photo_header
    from carclf_flavor.pyfunc import RequestLimits

    limits = RequestLimits.from_environment()
    PROCESS_DECODING.set_capacity(limits.max_decoding_pixels)
    prediction_slots = asyncio.Semaphore(int(max_concurrent_predictions))
    analyser = PhotoAnalyser(classifier, top_k)
    info = {
        "name": card.name,
        "version": card.version,
        "uri": card.uri,
        "source_run": card.source_run,
        "classes": list(classifier.class_names),
        "num_classes": len(classifier.class_names),
        "precision": classifier.precision,
        "precision_reason": classifier.precision_reason,
        "image_size": int(classifier.settings.image_size),
        "crop": classifier.settings.crop,
        "crop_margin": int(classifier.settings.crop_margin),
        "resize_mode": classifier.settings.resize_mode,
        "max_upload_bytes": max_upload_bytes,
        "max_files": max_files,
        "max_request_pixels": limits.max_pixels,
        "top_k": int(top_k),
        "heatmap_layer": analyser.gradcam.layer_name,
    }

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message.splitlines()[0] if message else "unknown error"}, status_code=status)

    async def index(request):
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def api_info(request):
        return JSONResponse(info)

    async def ping(request):
        return PlainTextResponse("ok\n")

    async def predict(request):
        name = (request.query_params.get("name") or "upload").strip()[:200] or "upload"
        try:
            bbox = _bbox_from_query(request.query_params)
        except PhotoError as exc:
            return error(400, f"{name}: {exc}")
        too_large = error(413, f"{name}: the file is larger than the {_megabytes(max_upload_bytes)} limit per photo")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes:
            too_large = error(
                413,
                f"{name}: the file is {_megabytes(int(declared))}, above the "
                f"{_megabytes(max_upload_bytes)} limit per photo",
            )
        body, received = bytearray(), 0
        async for chunk in request.stream():
            received += len(chunk)
            if received <= max_upload_bytes:
                body += chunk
            elif received > max_upload_bytes + _DRAIN_LIMIT_BYTES:
                break
        if received > max_upload_bytes:
            return too_large
        if not body:
            return error(400, f"{name}: the file is empty (0 bytes)")
        try:
            # The header only (no pixel decoded): the same checks and budget as a REST request's rows.
            header = read_photo_header(bytes(body), classifier.settings.max_pixels)
        except ValueError as exc:
            return error(400, f"{name}: {exc}")
        try:
            RequestPixels(limits.max_pixels).add(0, header.stored_size[0] * header.stored_size[1])
        except ValueError as exc:
            return error(413, f"{name}: {exc}")
        try:
            async with prediction_slots:
                answer = await run_in_threadpool(analyser.analyse, bytes(body), bbox)
        except (PhotoError, ValueError) as exc:  # ImageDecodeError is a ValueError
            return error(400, f"{name}: {exc}")
        except Exception as exc:  # one bad upload must never take the page down
            log.exception("predict failed for %s", name)
            return error(500, f"{name}: internal error ({type(exc).__name__}: {exc})")
        answer["name"] = name
        return JSONResponse(answer)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/info", api_info),
            Route("/api/predict", predict, methods=["POST"]),
            Route("/ping", ping),
            Mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static"),
        ]
    )
