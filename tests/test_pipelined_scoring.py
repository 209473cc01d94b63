"""Decoding overlapped with the network (``CarClassifier.classify_rows``, what the pyfunc runs): the same answers,
row for row, as scoring photo by photo: order, per-row errors with errors=coerce, the errors=raise message,
request limits; and the base64 fast path refuses exactly what the careful path refuses, with its messages."""

import base64
import binascii
import random

import numpy as np
import pandas as pd
import pytest

import carclf_flavor
from carclf_flavor import classifier as classifier_module
from carclf_flavor import pyfunc as pyfunc_module
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.pyfunc import decode_base64_image
from carclf_flavor.signature import top_k_entries
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes

SETTINGS = PreprocessSettings(image_size=IMAGE_SIZE, crop="bbox", crop_margin=4)
# 21 rows: three pipeline chunks of 8 (the last one short); bad rows in the middle of the first two chunks.
PHOTOS = [jpeg_bytes(70 + 7 * i, 50 + 3 * (i % 5), seed=100 + i) for i in range(21)]
BAD_ROWS = {
    3: b"not an image at all",  # undecodable bytes
    10: "@@@ not base64 @@@",  # refused before decoding
    12: PHOTOS[12][: len(PHOTOS[12]) // 2],  # truncated JPEG
}
BBOX_OUTSIDE_ROW = 17


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _frame() -> pd.DataFrame:
    images = [_b64(p) for p in PHOTOS]
    for row, bad in BAD_ROWS.items():
        images[row] = bad if isinstance(bad, str) else _b64(bad)
    boxes = [[None] * 4 for _ in images]
    boxes[5] = [2, 3, 40, 30]
    boxes[BBOX_OUTSIDE_ROW] = [5000, 5000, 6000, 6000]
    frame = pd.DataFrame({"image": images})
    for column, values in zip(("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"), zip(*boxes)):
        frame[column] = pd.Series(values, dtype=object)
    return frame


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipelined") / "model"
    carclf_flavor.save_model(
        build_tiny_resnet(seed=5), path, CLASS_NAMES, preprocessing=SETTINGS, inference_precision="float32"
    )
    return path


@pytest.fixture(scope="module")
def pyfunc_model(model_dir):
    import mlflow

    return mlflow.pyfunc.load_model(str(model_dir))


def test_batch_is_several_pipeline_chunks():
    assert len(PHOTOS) > 2 * classifier_module.PIPELINE_CHUNK


def test_pipelined_batch_answers_row_for_row_like_photo_by_photo(pyfunc_model):
    frame = _frame()
    batch = pyfunc_model.predict(frame, params={"errors": "coerce", "top_k": 3})
    assert len(batch) == len(frame)
    bad = set()
    for row in range(len(frame)):
        alone = pyfunc_model.predict(frame.iloc[[row]].reset_index(drop=True), params={"errors": "coerce", "top_k": 3})
        assert batch.error[row] == alone.error[0], row
        if alone.error[0] is not None:
            bad.add(row)
            assert batch.label[row] is None and batch.prob[row] is None and batch.top_k[row] == "[]"
            continue
        assert (batch.label[row], batch.class_id[row]) == (alone.label[0], alone.class_id[0]), row
        assert batch.prob[row] == pytest.approx(alone.prob[0], rel=1e-5, abs=1e-6), row
        mine, theirs = top_k_entries(batch.top_k[row]), top_k_entries(alone.top_k[0])
        assert [t["label"] for t in mine] == [t["label"] for t in theirs], row
        assert [t["prob"] for t in mine] == pytest.approx([t["prob"] for t in theirs], rel=1e-5)
    assert bad == set(BAD_ROWS) | {BBOX_OUTSIDE_ROW}
    assert "not base64" in batch.error[10] and "bbox" in batch.error[BBOX_OUTSIDE_ROW]
    # Rows are not shuffled: the probabilities of different photos differ.
    good = [r for r in range(len(frame)) if r not in bad]
    assert len({round(float(batch.prob[r]), 6) for r in good}) > len(good) // 2


def test_raise_names_the_first_bad_row_and_counts_the_others_like_unpipelined(pyfunc_model):
    frame = _frame()
    alone = [
        pyfunc_model.predict(frame.iloc[[r]].reset_index(drop=True), params={"errors": "coerce"}).error[0]
        for r in range(len(frame))
    ]
    bad = [r for r, e in enumerate(alone) if e is not None]
    expected = (
        f"row {bad[0]}: {alone[bad[0]]} (and {len(bad) - 1} more bad rows; params errors=coerce scores the good ones)"
    )
    with pytest.raises(carclf_flavor.InvalidInputError) as caught:
        pyfunc_model.predict(frame, params={"errors": "raise"})
    assert caught.value.message == expected


def test_raise_stops_calling_the_network_once_a_row_is_bad(model_dir, monkeypatch):
    classifier = carclf_flavor.load_model(str(model_dir))
    calls = []
    real = classifier.classify_pixels
    monkeypatch.setattr(
        classifier, "classify_pixels", lambda pixels, top_k: calls.append(len(pixels)) or real(pixels, top_k)
    )
    photos = list(PHOTOS)
    photos[classifier_module.PIPELINE_CHUNK + 2] = b"junk"  # in the second chunk
    with pytest.raises(carclf_flavor.ImageDecodeError, match=rf"^image {classifier_module.PIPELINE_CHUNK + 2}: "):
        classifier.predict(photos)
    assert calls == [classifier_module.PIPELINE_CHUNK]  # the first chunk only
    calls.clear()
    results = classifier.predict(photos, errors="coerce")
    assert sum(calls) == len(photos) - 1 and results[classifier_module.PIPELINE_CHUNK + 2] is None
    pixels, problems = classifier.preprocess(photos)
    expected = classifier.classify_pixels(pixels, 5)
    got = [r for r in results if r is not None]
    assert [r["class_id"] for r in got] == [r["class_id"] for r in expected]
    assert [r["prob"] for r in got] == pytest.approx([r["prob"] for r in expected], rel=1e-5, abs=1e-6)


def test_request_limit_reached_mid_request_is_the_same_refusal(model_dir, monkeypatch):
    import mlflow

    limit = sum(len(p) for p in PHOTOS[:9]) - 1  # passed at row 8, after the first chunk was handed to the pool
    monkeypatch.setenv("CARCLF_MAX_REQUEST_BYTES", str(limit))
    model = mlflow.pyfunc.load_model(str(model_dir))
    with pytest.raises(
        carclf_flavor.InvalidInputError, match=rf"^request's images add up to more than {limit} bytes by row 8 "
    ):
        model.predict(pd.DataFrame({"image": [_b64(p) for p in PHOTOS]}), params={"errors": "coerce"})
    # The worker is fine afterwards: the pending decodes were cancelled or finished, nothing leaked into the next.
    ok = model.predict(pd.DataFrame({"image": [_b64(p) for p in PHOTOS[:4]]}))
    assert len(ok) == 4 and ok.label.notna().all()


def test_decode_threads_follow_the_cpu_budget(monkeypatch):
    from carclf_flavor.int8_runtime import cpu_threads_for_inference

    monkeypatch.setenv("CARCLF_SERVER_WORKERS", "1")
    assert classifier_module.decode_threads() == min(8, cpu_threads_for_inference())
    monkeypatch.setenv("CARCLF_SERVER_WORKERS", "64")
    assert classifier_module.decode_threads() == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("aGVsbG8=", None),
        ("aGVs\nbG8=\n", None),
        ("data:image/jpeg;base64,aGVsbG8=", None),
        ("aGVsbG8", "not valid base64"),  # missing padding
        ("aGVsbG8===", "not valid base64"),
        ("aGV=sbG8", "not valid base64"),
        ("=aGVsbG8", "not valid base64"),
        ("aGVs-bG8=", "character '-' at position 4"),
        ("aGVsé", "character 'é' at position 4"),
        ("   ", "empty image"),
    ],
)
def test_base64_fast_path_accepts_and_refuses_as_the_careful_path(text, message):
    if message is None:
        assert decode_base64_image(text) == base64.b64decode("".join(text.split(",")[-1].split()), validate=True)
    else:
        with pytest.raises(ValueError, match=message):
            decode_base64_image(text)


def test_base64_fast_path_gives_the_same_bytes_on_random_data():
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 4, 5, 1000, 4099):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert decode_base64_image(base64.b64encode(data).decode("ascii")) == data
        assert decode_base64_image(base64.encodebytes(data).decode("ascii")) == data


def _careful_decode(text: str) -> bytes | None:
    """The slow path's rule alone (whitespace removed, then base64.b64decode(validate=True)); None: refused."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            return None
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True) if compact else None
    except (binascii.Error, ValueError):
        return None


@pytest.mark.parametrize("decoder", ["pybase64", "binascii fallback"])
def test_base64_fast_path_agrees_with_the_careful_rule_on_random_text(decoder, monkeypatch):
    """The SIMD decoder is stricter than the careful rule in places (it refuses '=' after the padding): what it
    refuses must take the careful path, so the answer is the careful rule's, with or without pybase64."""
    if decoder == "binascii fallback":
        monkeypatch.setattr(pyfunc_module, "_strict_b64decode", pyfunc_module._binascii_strict_b64decode)
    else:
        import pybase64

        assert pyfunc_module._strict_b64decode is pybase64.b64decode
    rng = random.Random(0)
    alphabet = "ABab01+/=\n -"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(5000)]
    texts += ["QUJD=", "QUJDRA===", "data:image/png;base64,QUJD\nRA==", "data:x,QUJD"]
    for text in texts:
        expected = _careful_decode(text)
        if expected is None:
            with pytest.raises(ValueError):
                decode_base64_image(text)
        else:
            assert decode_base64_image(text) == expected, repr(text)
