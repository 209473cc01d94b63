"""``CarClassifier``: a Keras network + class names + the preprocessing it was trained with.

``predict`` (in-process) and the pyfunc wrapper (``carclf_flavor.pyfunc``, what ``mlflow models serve`` runs)
both go through ``classify_rows``: the photos are decoded on a thread pool, in order, while the network runs on
the chunks already decoded (decoding is off the critical path but for the first chunk), then one ranking.
``preprocess`` -> ``classify_pixels`` is the same work without the overlap (the demo, benchmarks).
"""

from __future__ import annotations

import numbers
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from carclf_flavor.budget import PROCESS_DECODING
from carclf_flavor.deadline import NO_DEADLINE, Deadline
from carclf_flavor.errors import first_problem_message
from carclf_flavor.images import ImageDecodeError, PhotoHeader, PreprocessSettings, prepare_photo
from carclf_flavor.signature import DEFAULT_TOP_K

# Images per network call: bounds activation memory whatever the request's batch size.
INFERENCE_CHUNK = 64
# Images per network call in ``classify_rows``: the network runs on chunk i while the pool decodes the next
# ones, so only the first chunk's decoding is waited for; big enough that the network's batch efficiency holds.
PIPELINE_CHUNK = 8

_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def decode_threads() -> int:
    """Decoding threads of this process: the CPUs it may use (affinity, cgroup quota) shared among the server's
    workers, as for the network's threads (``int8_runtime.cpu_threads_for_inference``), at most 8."""
    from carclf_flavor.int8_runtime import cpu_threads_for_inference

    return max(1, min(8, cpu_threads_for_inference()))


def _decode_pool() -> ThreadPoolExecutor:
    # OpenCV and Pillow release the GIL while decoding: a few threads decode a batch in parallel.
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="carclf-decode")
        return _executor


class CarClassifier:
    """A Keras network + class names + the preprocessing it was trained with. Thread-safe."""

    def __init__(
        self,
        model,
        class_names: Sequence[str],
        settings: PreprocessSettings,
        precision: str = "float32",
        precision_reason: str = "",
        int8_network=None,
    ):
        import tensorflow as tf

        self.model = model
        self.class_names = list(class_names)
        self.settings = settings
        self.precision = precision
        self.precision_reason = precision_reason
        size = int(settings.image_size)
        self._num_classes = len(self.class_names)
        if int8_network is not None:  # carclf_flavor.int8_runtime.OpenVINONetwork: pixels -> probabilities
            self._forward = int8_network
            return
        # One traced graph with a fixed signature: concurrent calls never retrace (Keras' predict() is not
        # safe to call from several threads at once), and a batch is a single call.
        self._forward = tf.function(
            lambda pixels: tf.cast(model(pixels, training=False), tf.float32),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            reduce_retracing=False,
        )
        self._forward(tf.zeros([1, size, size, 3], tf.uint8))  # trace now, not inside the first request

    # -- preprocessing ------------------------------------------------------------------------------
    def _prepare_one(self, image, bbox) -> np.ndarray:
        # Bytes, a header read from them, or a uint8 array, through the one preparation the training data went
        # through (same bbox policy); decodes share the process's pixel budget, whichever request they serve.
        if isinstance(image, (bytearray, memoryview)):
            image = bytes(image)
        if not isinstance(image, (bytes, np.ndarray, PhotoHeader)) or (
            isinstance(image, np.ndarray) and image.dtype == object
        ):
            raise ImageDecodeError(f"expected encoded image bytes or a uint8 array, got {type(image).__name__}")
        return prepare_photo(image, bbox, self.settings, decoding=PROCESS_DECODING)

    def _prepare_or_problem(self, image, bbox) -> tuple[np.ndarray | None, str | None]:
        try:
            return self._prepare_one(image, bbox), None
        except (ImageDecodeError, ValueError, TypeError) as exc:
            return None, str(exc)

    def preprocess(
        self, images: Sequence[Any], bboxes: Sequence[Any] | None = None
    ) -> tuple[np.ndarray, list[str | None]]:
        """Decode/crop/resize each image (in parallel); returns (pixels of the good ones, error per input)."""
        bboxes = list(bboxes) if bboxes is not None else [None] * len(images)
        if len(bboxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(bboxes)} bboxes")

        def prepare(index):
            return self._prepare_or_problem(images[index], bboxes[index])

        if len(images) > 1:
            results = list(_decode_pool().map(prepare, range(len(images))))
        else:
            results = [prepare(i) for i in range(len(images))]
        errors = [error for _, error in results]
        size = int(self.settings.image_size)
        good = [pixels for pixels, error in results if error is None]
        batch = np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)
        return batch, errors

    # -- prediction ---------------------------------------------------------------------------------
    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, num_classes) float32 probabilities, in one network call."""
        if len(pixels) == 0:
            return np.zeros((0, self._num_classes), np.float32)
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        chunks = [
            self._forward(pixels[start : start + INFERENCE_CHUNK]) for start in range(0, len(pixels), INFERENCE_CHUNK)
        ]
        return np.concatenate([c if isinstance(c, np.ndarray) else c.numpy() for c in chunks])

    def classify_pixels(self, pixels: np.ndarray, top_k: int) -> list[dict]:
        """(N, S, S, 3) uint8 -> one dict per image: ``label``, ``class_id``, ``prob``, ``top_k`` (list of
        {label, prob}, most likely first; ``top_k`` >= 1, at most the number of classes)."""
        return self._rank(self.predict_pixels(pixels), top_k)

    def classify_rows(
        self,
        rows: Iterable[tuple[Any, Any, str | None]],
        top_k: int,
        stop_at_problem: bool = False,
        deadline: Deadline = NO_DEADLINE,
    ) -> tuple[list[dict | None], list[str | None]]:
        """Decode and classify, decoding off the critical path; returns (result or None, problem or None) per row.

        ``rows``: (image, bbox, problem) per row, in order; a row with a problem already (bad base64, say) is
        not decoded. Each photo is handed to the decode pool as soon as its row is read (``rows`` may be a
        generator still reading the request), and the network runs on each ``PIPELINE_CHUNK`` of decoded
        photos in row order while the pool decodes the next: the same predictions, in the same order, as
        ``preprocess`` then ``classify_pixels``. ``stop_at_problem`` (errors="raise"): once a row is bad no
        more network calls are made (the request fails anyway), but every row is still decoded so that the
        problems are the same as unpipelined. An exception from ``rows`` cancels the pending decodes.
        ``deadline``: checked before each decode starts and before each network call; once it has passed the
        pending decodes are cancelled and ``DeadlinePassed`` is raised (a decode under way finishes first).
        """
        pool = _decode_pool()
        problems: list[str | None] = []
        pending: list[Future | None] = []

        def prepare(row, image, bbox):
            deadline.check(f"before decoding row {row}")
            return self._prepare_or_problem(image, bbox)

        try:
            for image, bbox, problem in rows:
                problems.append(problem)
                pending.append(None if problem is not None else pool.submit(prepare, len(pending), image, bbox))
            results: list[dict | None] = [None] * len(pending)
            todo = [i for i, future in enumerate(pending) if future is not None]
            for start in range(0, len(todo), PIPELINE_CHUNK):
                good, pixels = [], []
                for i in todo[start : start + PIPELINE_CHUNK]:
                    prepared, problems[i] = pending[i].result()
                    if problems[i] is None:
                        good.append(i)
                        pixels.append(prepared)
                if pixels and not (stop_at_problem and any(p is not None for p in problems)):
                    deadline.check(f"before classifying rows {good[0]}-{good[-1]} of {len(pending)}")
                    for i, result in zip(good, self.classify_pixels(np.stack(pixels), top_k)):
                        results[i] = result
        except BaseException:
            # Nobody will read the rest: decodes not started yet are dropped.
            for future in pending:
                if future is not None:
                    future.cancel()
            raise
        return results, problems

    def _rank(self, probs: np.ndarray, top_k: int) -> list[dict]:
        k = min(int(top_k), self._num_classes)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        results = []
        for row, ranked in zip(probs, order):
            best = int(ranked[0])
            results.append(
                {
                    "label": self.class_names[best],
                    "class_id": best,
                    "prob": float(row[best]),
                    "top_k": [{"label": self.class_names[int(c)], "prob": float(row[int(c)])} for c in ranked],
                }
            )
        return results

    def predict(self, images, top_k: int = DEFAULT_TOP_K, bboxes=None, errors: str = "raise") -> list[dict | None]:
        """Classify encoded images (bytes) or uint8 RGB arrays; one dict per image.

        Each dict: ``label``, ``class_id``, ``prob``, ``top_k`` (list of {label, prob}, most likely first).
        ``bboxes``: one (x1, y1, x2, y2) or None per image, in source pixels. ``errors="raise"`` raises
        ``ImageDecodeError`` naming the first bad image; ``"coerce"`` returns None for bad images.
        """
        if isinstance(images, (bytes, bytearray)) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        images = list(images)
        if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        bboxes = list(bboxes) if bboxes is not None else [None] * len(images)
        if len(bboxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(bboxes)} bboxes")
        results, problems = self.classify_rows(
            ((image, bbox, None) for image, bbox in zip(images, bboxes)), top_k, stop_at_problem=errors == "raise"
        )
        if errors == "raise" and (message := first_problem_message(problems, "image")):
            raise ImageDecodeError(message)
        return results
