"""Pixel budgets: a request's photos summed from their headers (refused before any decode), and the pixels one
process decodes at once (bounded whatever the number of parallel callers)."""

from __future__ import annotations

import sys
import threading

import pandas as pd
import pytest

import carclf_flavor
from carclf_flavor import classifier as flavor_classifier
from carclf_flavor import images as flavor_images
from carclf_flavor.budget import PROCESS_DECODING, DecodingPixels, RequestPixels
from tests.helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes
from tests.helpers_hostile import bomb_png

SIDE = 2000  # a 4-megapixel PNG of 12 KB: cheap to build and to send, 12 MB once decoded
PHOTO_PIXELS = SIDE * SIDE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("budget") / "model"
    carclf_flavor.save_model(
        build_tiny_resnet(seed=5),
        path,
        CLASS_NAMES,
        preprocessing=carclf_flavor.PreprocessSettings(image_size=IMAGE_SIZE, crop="none"),
        inference_precision="float32",
    )
    return path


@pytest.fixture(scope="module")
def png():
    return bomb_png(SIDE, SIDE)


class DecodeCalls:
    """Counts calls of ``carclf_flavor.images.decode_photo`` in every thread (a profile hook: nothing replaced).

    A profile hook reaches only the threads started after it is set: the decode pool is started afresh inside
    the block (and shut down after it), so that its threads are counted too.
    """

    def __init__(self):
        self.count = 0
        self._code = flavor_images.decode_photo.__code__

    def _hook(self, frame, event, arg):
        if event == "call" and frame.f_code is self._code:
            self.count += 1

    def __enter__(self):
        threading.setprofile(self._hook)
        sys.setprofile(self._hook)
        self._previous_pool, flavor_classifier._executor = flavor_classifier._executor, None
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        threading.setprofile(None)
        pool, flavor_classifier._executor = flavor_classifier._executor, self._previous_pool
        if pool is not None:
            pool.shutdown(wait=True)


def test_request_over_the_pixel_budget_is_refused_in_one_line_before_any_decode(model_dir, png):
    import mlflow

    model = mlflow.pyfunc.load_model(str(model_dir), model_config={"max_request_pixels": 2 * PHOTO_PIXELS + 1})
    assert len(model.predict(pd.DataFrame({"image": [png, png]}))) == 2  # within the budget: scored

    rows = [png, png, png, jpeg_bytes(), png]  # the sum crosses the budget at row 2
    PROCESS_DECODING.reset_peak()
    with DecodeCalls() as calls:
        with pytest.raises(carclf_flavor.InvalidInputError) as raised:
            model.predict(pd.DataFrame({"image": rows}), params={"errors": "coerce"})
    message = raised.value.message
    assert message.startswith("request's images add up to 12.0 megapixels by row 2, above the budget of 8.0 megapixels")
    assert "CARCLF_MAX_REQUEST_PIXELS" in message and "\n" not in message
    assert calls.count == 0 and PROCESS_DECODING.peak == 0


def test_pixel_budget_from_the_environment_and_bad_values(model_dir, png, monkeypatch):
    import mlflow

    monkeypatch.setenv("CARCLF_MAX_REQUEST_PIXELS", str(PHOTO_PIXELS))
    model = mlflow.pyfunc.load_model(str(model_dir))
    assert len(model.predict(pd.DataFrame({"image": [png]}))) == 1
    with pytest.raises(carclf_flavor.InvalidInputError, match="by row 1, above the budget of 4.0 megapixels"):
        model.predict(pd.DataFrame({"image": [png, jpeg_bytes()]}))
    monkeypatch.setenv("CARCLF_MAX_REQUEST_PIXELS", "many")
    with pytest.raises(ValueError, match="CARCLF_MAX_REQUEST_PIXELS must be a positive integer, got 'many'"):
        mlflow.pyfunc.load_model(str(model_dir))
    monkeypatch.delenv("CARCLF_MAX_REQUEST_PIXELS")
    monkeypatch.setenv("CARCLF_MAX_DECODING_PIXELS", "0")
    with pytest.raises(ValueError, match="CARCLF_MAX_DECODING_PIXELS must be a positive integer, got '0'"):
        mlflow.pyfunc.load_model(str(model_dir))


def test_a_photo_refused_by_its_header_is_a_row_error_without_decoding(model_dir):
    import mlflow

    model = mlflow.pyfunc.load_model(str(model_dir))
    with DecodeCalls() as calls:
        frame = model.predict(pd.DataFrame({"image": [bomb_png(8000, 8000)]}), params={"errors": "coerce"})
    assert frame.error[0] == "image is 8000x8000 = 64.0 megapixels, above the limit of 50.0 megapixels"
    assert calls.count == 0


def test_parallel_callers_never_decode_more_pixels_at_once_than_the_process_budget(model_dir, png):
    classifier = carclf_flavor.load_model(str(model_dir))

    def run_parallel(callers: int) -> int:
        PROCESS_DECODING.reset_peak()
        problems = []
        threads = [
            threading.Thread(target=lambda: problems.extend(classifier.preprocess([png])[1])) for _ in range(callers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert problems == [None] * callers
        return PROCESS_DECODING.peak

    capacity = PROCESS_DECODING.capacity
    try:
        PROCESS_DECODING.set_capacity(PHOTO_PIXELS + PHOTO_PIXELS // 2)  # room for one photo at a time
        assert run_parallel(6) == PHOTO_PIXELS
        PROCESS_DECODING.set_capacity(100 * PHOTO_PIXELS)  # the same callers, unbounded: they overlap
        assert run_parallel(6) >= 2 * PHOTO_PIXELS
    finally:
        PROCESS_DECODING.set_capacity(capacity)
    assert PROCESS_DECODING.in_use == 0


def test_decoding_pixels_admits_a_photo_larger_than_its_capacity_alone():
    budget = DecodingPixels(10)
    with budget.hold(25):
        assert budget.in_use == 10
    assert budget.in_use == 0 and budget.peak == 10


def test_request_pixels_names_the_row_where_the_sum_crosses():
    pixels = RequestPixels(5_000_000)
    pixels.add(0, 3_000_000)
    with pytest.raises(ValueError, match=r"^request's images add up to 6.0 megapixels by row 1, above the budget"):
        pixels.add(1, 3_000_000)


def test_a_request_past_the_servers_timeout_stops_decoding_and_classifying(model_dir, png, monkeypatch):
    import mlflow

    rows = pd.DataFrame({"image": [png] * 48})
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "0.05")  # what `mlflow models serve` sets
    model = mlflow.pyfunc.load_model(str(model_dir))
    with DecodeCalls() as calls:
        with pytest.raises(carclf_flavor.InternalModelError) as raised:
            model.predict(rows)
    # (leaving the block waited for the decodes under way; none may start after the deadline)
    message = raised.value.message
    assert message.startswith("request timed out after 0.05 s (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT); stopped ")
    assert "\n" not in message
    # A 4-megapixel PNG takes tens of milliseconds to decode: a few decode threads cannot get through the
    # request's 48 before 0.05 s, and the ones not started are dropped.
    assert calls.count < len(rows) // 2, calls.count

    monkeypatch.delenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")
    with DecodeCalls() as calls:
        assert len(mlflow.pyfunc.load_model(str(model_dir)).predict(rows)) == len(rows)  # no timeout: all scored
    assert calls.count == len(rows)


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
def test_a_bad_request_timeout_is_refused_at_load_in_one_line(model_dir, monkeypatch, value):
    from carclf_flavor.pyfunc import RequestLimits

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", value)
    with pytest.raises(ValueError, match=r"^MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT must be a positive number"):
        RequestLimits.from_environment()
