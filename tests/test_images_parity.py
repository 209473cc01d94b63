"""One photo preparation for training data and serving: identical pixels from both paths, one header
parse per photo, one bbox policy, and reduced JPEG decoding that stays close to a full decode.

Training path: ``carclf.data.preprocessing.process_photo`` on the file (what every preprocess worker runs).
Serving path: ``CarClassifier.preprocess`` on the bytes (what ``predict``, the served pyfunc and the demo run).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import PIL.Image
import pytest
from PIL import Image

from carclf.data.preprocessing import process_photo
from carclf_flavor.images import (
    BoundingBoxError,
    ImageDecodeError,
    PreprocessSettings,
    crop_and_resize,
    decode_image,
    decode_region,
    prepare_photo,
    read_photo_header,
)
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet

WIDTH, HEIGHT = 200, 150  # large enough for 1/2 and 1/4 JPEG decoding at 32 px


def scene(width=WIDTH, height=HEIGHT, seed=0) -> np.ndarray:
    """Smooth gradients + blocks, left half reddish, right half bluish: orientation and crop mistakes show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, (x + 2 * y) % 256], axis=-1).astype(np.uint8)
    image[:, : width // 2, 0] = 220
    image[:, width // 2 :, 2] = 220
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        image[y0 : y0 + 20, x0 : x0 + 20] = rng.integers(0, 256, 3)
    return image


def encode(image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def exif_rotated(fmt: str, orientation: int = 6, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(scene(seed=3), fmt, exif=exif.tobytes(), **kwargs)


PHOTOS = {
    "jpeg": encode(scene(seed=1), "JPEG", quality=92),
    "progressive jpeg": encode(scene(seed=2), "JPEG", quality=85, progressive=True),
    "grey jpeg": encode(scene(seed=4)[:, :, 1], "JPEG", quality=90),
    "cmyk jpeg": encode(Image.fromarray(scene(seed=5)).convert("CMYK"), "JPEG", quality=90),
    "jpeg exif 6": exif_rotated("JPEG", 6, quality=92),
    "jpeg exif 3": exif_rotated("JPEG", 3, quality=92),
    "png": encode(scene(seed=6), "PNG"),
    "png exif 8": exif_rotated("PNG", 8),
    "webp": encode(scene(seed=7), "WEBP", quality=90),
    "gif": encode(scene(seed=8), "GIF"),
}

BBOX = PreprocessSettings(image_size=IMAGE_SIZE, crop="bbox", crop_margin=4)
NONE = PreprocessSettings(image_size=IMAGE_SIZE, crop="none")
BOXES = {
    "no box": None,
    "inside": (20, 15, 140, 110),
    "partly outside": (-30, 40, 400, 120),
    "small": (60, 50, 90, 80),
}


@pytest.fixture(scope="module")
def classifiers():
    from carclf_flavor.classifier import CarClassifier

    model = build_tiny_resnet(seed=3)
    pad = PreprocessSettings(image_size=IMAGE_SIZE, crop="bbox", crop_margin=0, resize_mode="pad")
    return {
        name: CarClassifier(model, CLASS_NAMES, settings)
        for name, settings in [("bbox", BBOX), ("none", NONE), ("pad", pad)]
    }


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    paths = {}
    for i, (name, data) in enumerate(PHOTOS.items()):
        paths[name] = root / f"{i:02d}.img"
        paths[name].write_bytes(data)
    return paths


def training_pixels(path, bbox, settings):
    result = process_photo((str(path), bbox), settings)
    return result[1] if result[0] == "ok" else result[1]


def serving_pixels(classifier, data, bbox):
    pixels, errors = classifier.preprocess([data, data], [bbox, bbox])  # two rows: the decode pool's path
    if errors[0] is not None:
        assert errors == [errors[0]] * 2
        return errors[0]
    assert np.array_equal(pixels[0], pixels[1])
    return pixels[0]


@pytest.mark.parametrize("box_name", list(BOXES))
@pytest.mark.parametrize("crop", ["bbox", "none", "pad"])
def test_training_and_serving_produce_identical_pixels(classifiers, photo_files, crop, box_name):
    classifier = classifiers[crop]
    for name, data in PHOTOS.items():
        trained = training_pixels(photo_files[name], BOXES[box_name], classifier.settings)
        served = serving_pixels(classifier, data, BOXES[box_name])
        assert isinstance(trained, np.ndarray), f"{name}: training skipped it: {trained}"
        assert trained.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and trained.dtype == np.uint8
        assert np.array_equal(trained, served), name


def test_the_box_matters_exactly_when_crop_uses_it(classifiers, photo_files):
    data, path = PHOTOS["jpeg"], photo_files["jpeg"]
    whole = serving_pixels(classifiers["none"], data, None)
    assert not np.array_equal(serving_pixels(classifiers["bbox"], data, BOXES["small"]), whole)
    for box in (BOXES["small"], BOXES["partly outside"]):
        assert np.array_equal(serving_pixels(classifiers["none"], data, box), whole)
        assert np.array_equal(training_pixels(path, box, NONE), whole)


@pytest.mark.parametrize("nonsense", [(500, 500, 600, 600), (50, 10, 20, 40), (5, 5, 5, 80), (-90, -90, -10, -10)])
def test_crop_none_ignores_a_nonsense_box_in_both_paths(classifiers, photo_files, nonsense):
    for name in ("jpeg", "jpeg exif 6", "png"):
        expected = prepare_photo(PHOTOS[name], None, NONE)
        assert np.array_equal(training_pixels(photo_files[name], nonsense, NONE), expected)
        assert np.array_equal(serving_pixels(classifiers["none"], PHOTOS[name], nonsense), expected)
        _, box, clamped = process_photo((str(photo_files[name]), nonsense), NONE)[1:]
        assert box == (0, 0, *read_photo_header(PHOTOS[name]).size) and not clamped


@pytest.mark.parametrize(
    "bad,message",
    [
        ((500, 500, 600, 600), "bbox (500, 500, 600, 600) lies outside the 200x150 image"),
        ((50, 10, 20, 40), "bbox (50, 10, 20, 40) is empty or inverted (need x1 < x2 and y1 < y2)"),
        ((5, 5, 5, 80), "bbox (5, 5, 5, 80) is empty or inverted"),
        ((-90, -90, -10, -10), "bbox (-90, -90, -10, -10) lies outside the 200x150 image"),
    ],
)
def test_crop_bbox_refuses_a_bad_box_the_same_way_in_both_paths(classifiers, photo_files, bad, message):
    trained = process_photo((str(photo_files["png"]), bad), BBOX)
    served = serving_pixels(classifiers["bbox"], PHOTOS["png"], bad)
    assert trained[0] == "skip" and trained[1] == served and served.startswith(message)
    with pytest.raises(BoundingBoxError, match="bbox"):
        prepare_photo(PHOTOS["png"], bad, BBOX)
    array = scene()
    with pytest.raises(BoundingBoxError) as from_array:
        prepare_photo(array, bad, BBOX)
    assert str(from_array.value) == served


def test_a_box_is_in_the_displayed_frame_and_clamped_the_same_way(photo_files):
    # Orientation 6: stored 200x150, displayed 150x200; the box is clamped against the displayed frame.
    _, box, clamped = process_photo((str(photo_files["jpeg exif 6"]), (10, 150, 400, 190)), BBOX)[1:]
    assert box == (10, 150, 150, 190) and clamped
    with pytest.raises(BoundingBoxError, match="outside the 150x200 image"):
        prepare_photo(PHOTOS["jpeg exif 6"], (160, 10, 190, 50), BBOX)


def test_arrays_follow_the_same_policy_as_encoded_photos(classifiers):
    array = scene(seed=9)
    lossless = encode(array, "PNG")
    for crop in ("bbox", "none", "pad"):
        for box in BOXES.values():
            from_array = serving_pixels(classifiers[crop], array, box)
            assert np.array_equal(from_array, serving_pixels(classifiers[crop], lossless, box)), (crop, box)


@pytest.fixture
def count_opens(monkeypatch):
    """Counts Pillow parses (PIL.Image.open) and OpenCV header reads made while preparing a photo."""
    calls = {"open": 0}
    real_open = PIL.Image.open

    def counting_open(*args, **kwargs):
        calls["open"] += 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    return calls


def test_the_header_is_parsed_once_per_photo(count_opens, classifiers, photo_files):
    for name, data in PHOTOS.items():
        for settings, box in ((BBOX, BOXES["inside"]), (BBOX, BOXES["partly outside"]), (NONE, (9, 9, 1, 1))):
            count_opens["open"] = 0
            prepare_photo(data, box, settings)
            assert count_opens["open"] == 1, (name, settings.crop, box)
        count_opens["open"] = 0
        assert process_photo((str(photo_files[name]), BOXES["inside"]), BBOX)[0] == "ok"
        assert count_opens["open"] == 1, name
        count_opens["open"] = 0
        serving_pixels(classifiers["bbox"], data, BOXES["inside"])
        assert count_opens["open"] == 2, name  # two rows, one parse each
    count_opens["open"] = 0
    with pytest.raises(BoundingBoxError):  # refused from the header: no second look, no decode
        prepare_photo(PHOTOS["jpeg"], (500, 500, 600, 600), BBOX)
    assert count_opens["open"] == 1


def test_a_photo_file_that_cannot_be_read_is_one_line(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"^cannot read file \(No such file or directory\)$"):
        prepare_photo(tmp_path / "missing.jpg", None, BBOX)
    assert process_photo((str(tmp_path / "missing.jpg"), None), BBOX) == (
        "skip",
        "cannot read file (No such file or directory)",
    )


# ------------------------------------------------------------------------------------------------ draft decoding
def photo_700x500(seed=0) -> bytes:
    """The benchmark's kind of photo: a rendered car scene at 700x500, JPEG quality 90."""
    from carclf.data.sample_data import render_photo

    image, _ = render_photo(seed % 10, np.random.default_rng([7, seed]), 700, 700)
    image = cv2.resize(image, (700, 500), interpolation=cv2.INTER_AREA)
    return encode(image, "JPEG", quality=90)


# Mean and 99th-percentile absolute difference (levels of 255) allowed against a full decode + the same resize.
# The 1/8 scale (an 8x8 block average) is the coarsest: only chosen when the output is at most 1/8 of the photo.
@pytest.mark.parametrize(
    "size,box,scale,mean_bound,p99_bound",
    [
        (224, None, 2, 1.5, 16),
        (64, None, 4, 1.25, 12),
        (32, None, 8, 5.0, 36),
        (64, (100, 80, 620, 460), 4, 1.75, 18),
        (224, (300, 200, 420, 300), 1, 0.0, 0),
    ],
)
def test_draft_decoding_is_close_to_a_full_decode(size, box, scale, mean_bound, p99_bound):
    settings = PreprocessSettings(image_size=size, crop="bbox" if box else "none", crop_margin=8)
    for seed in range(3):
        data = photo_700x500(seed)
        header = read_photo_header(data)
        region = (0, 0, 700, 500) if box is None else (box[0] - 8, box[1] - 8, box[2] + 8, box[3] + 8)
        decoded = decode_region(header, region, size)
        # The reduced decode really happened, and still covers the output size.
        assert decoded.shape[:2] == (-(-(region[3] - region[1]) // scale), -(-(region[2] - region[0]) // scale))
        assert min(decoded.shape[:2]) >= min(size, region[2] - region[0], region[3] - region[1])
        reduced = prepare_photo(data, box, settings)
        full = crop_and_resize(decode_image(data, reduce=1), box, settings)
        diff = np.abs(reduced.astype(np.int16) - full.astype(np.int16))
        assert diff.mean() <= mean_bound and np.percentile(diff, 99) <= p99_bound, (seed, diff.mean())
