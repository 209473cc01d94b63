"""carclf_flavor.images: decoding of real encoded files of every kind, bbox crop geometry, bad input."""

import io
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from PIL import Image

from carclf_flavor.images import (
    PAD_VALUE,
    ImageDecodeError,
    PreprocessSettings,
    choose_reduction,
    clamp_bbox,
    crop_and_resize,
    decode_image,
    decode_photo,
    image_size_of,
    prepare_photo,
    read_photo_header,
)

RED, GREEN, BLUE, GREY = (230, 20, 20), (20, 200, 40), (30, 40, 220), (128, 128, 128)


def encode(image, fmt, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def halves(width=48, height=32, left=RED, right=BLUE) -> np.ndarray:
    """Left half one colour, right half another: orientation mistakes are visible."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = left
    array[:, width // 2 :] = right
    return array


def close(actual, expected, tol=12):
    return np.all(np.abs(np.asarray(actual, np.int16) - np.asarray(expected, np.int16)) <= tol)


# ------------------------------------------------------------------------------------------------ decoding
def test_rgb_jpeg_is_rgb_not_bgr():
    data = encode(Image.fromarray(halves()), "JPEG", quality=95)
    image = decode_image(data)
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8
    assert close(image[16, 5], RED) and close(image[16, 42], BLUE)


def test_grayscale_jpeg_becomes_three_equal_channels():
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    image = decode_image(encode(Image.fromarray(gray, "L"), "JPEG", quality=95))
    assert image.shape == (16, 32, 3)
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
    assert close(image[8, 31], 248, tol=6)


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.fromarray(halves(left=RED, right=GREEN)).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data)
    assert image.shape == (32, 48, 3)
    assert close(image[16, 5], RED, tol=20) and close(image[16, 42], GREEN, tol=20)


def test_rgba_png_is_composited_over_white():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (*RED, 255)  # opaque
    rgba[:, 10:] = (*BLUE, 0)  # fully transparent
    image = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert image.shape == (20, 20, 3)
    assert tuple(image[5, 2]) == RED
    assert tuple(image[5, 15]) == (255, 255, 255)


def test_palette_png_with_transparency():
    pal = Image.fromarray(halves(20, 10, RED, GREEN)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    red_index = pal.getpixel((0, 0))
    data = encode(pal, "PNG", transparency=red_index)
    image = decode_image(data)
    assert image.shape == (10, 20, 3)
    assert tuple(image[5, 1]) == (255, 255, 255)  # transparent entry -> white
    assert close(image[5, 18], GREEN, tol=4)


def test_sixteen_bit_png_keeps_the_high_byte():
    gray16 = np.full((8, 8), 0x12F0, np.uint16)
    ok, encoded = cv2.imencode(".png", gray16)
    assert ok
    image = decode_image(encoded.tobytes())
    assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
    assert np.all(image == 0x12)
    colour16 = np.zeros((8, 8, 3), np.uint16)
    colour16[..., 2] = 0xFF00  # OpenCV order: channel 2 = red
    ok, encoded = cv2.imencode(".png", colour16)
    image = decode_image(encoded.tobytes())
    assert tuple(image[0, 0]) == (0xFF, 0, 0)


def test_webp_lossless_roundtrip():
    array = halves()
    image = decode_image(encode(Image.fromarray(array), "WEBP", lossless=True))
    assert np.array_equal(image, array)


@pytest.mark.parametrize("reduce", [1, 2])
def test_exif_orientation_is_applied(reduce):
    # Stored landscape, left red / right blue; orientation 6 = display rotated 90 degrees clockwise,
    # so the displayed photo is portrait with red on TOP.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(halves(64, 32)), "JPEG", quality=95, exif=exif.tobytes())
    assert image_size_of(data) == (32, 64)
    image = decode_image(data, reduce=reduce)
    assert image.shape == (64 // reduce, 32 // reduce, 3)
    h = image.shape[0]
    assert close(image[h // 8, image.shape[1] // 2], RED, tol=25)
    assert close(image[h - 1 - h // 8, image.shape[1] // 2], BLUE, tol=25)


def test_exif_orientation_on_png():
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display: left half goes to the bottom
    data = encode(Image.fromarray(halves(64, 32)), "PNG", exif=exif.tobytes())
    image = decode_image(data)
    assert image.shape == (64, 32, 3)
    assert close(image[60, 16], RED) and close(image[4, 16], BLUE)


# ------------------------------------------------------------------------------------------------ bad input
def test_zero_bytes():
    with pytest.raises(ImageDecodeError, match="0 bytes"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="0 bytes"):
        prepare_photo(b"", None, PreprocessSettings(image_size=32))


def test_random_bytes_and_text_are_not_images():
    rng = np.random.default_rng(0)
    for data in (rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), b"hello, I am a text file\n" * 10):
        with pytest.raises(ImageDecodeError, match="not a recognised image"):
            decode_image(data)


def test_truncated_jpeg_is_refused():
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    for cut in (len(data) // 2, len(data) - 2):
        with pytest.raises(ImageDecodeError, match="truncated"):
            decode_image(data[:cut])


def test_corrupt_jpeg_body_is_refused():
    data = bytearray(encode(Image.fromarray(halves(64, 64)), "JPEG"))
    # Keep the header (PIL can still read the size) but destroy the scan data.
    start = data.index(b"\xff\xda")
    data[start + 2 : len(data) - 2] = b"\x00" * (len(data) - start - 4)
    with pytest.raises(ImageDecodeError):
        prepare_photo(bytes(data), None, PreprocessSettings(image_size=32))


def test_pixel_limit():
    data = encode(Image.fromarray(halves(100, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match="megapixels"):
        decode_image(data, max_pixels=5_000)


# ------------------------------------------------------------------------------------------------ crop geometry
def box_scene(width=200, height=160, box=(50, 40, 150, 120)) -> np.ndarray:
    """Grey photo; inside ``box``: left half red, right half green."""
    image = np.full((height, width, 3), GREY, np.uint8)
    x1, y1, x2, y2 = box
    mid = (x1 + x2) // 2
    image[y1:y2, x1:mid] = RED
    image[y1:y2, mid:x2] = GREEN
    return image


def test_bbox_crop_puts_the_pattern_where_expected():
    box = (50, 40, 150, 120)
    out = crop_and_resize(box_scene(box=box), box, PreprocessSettings(image_size=32, crop_margin=0))
    assert out.shape == (32, 32, 3)
    assert close(out[:, :15], RED, tol=2) and close(out[:, 17:], GREEN, tol=2)
    assert not np.any(np.all(out == GREY, axis=-1))  # no background left without a margin


def test_bbox_crop_margin_adds_the_expected_border():
    box, margin = (50, 40, 150, 120), 25  # region 150 x 130 around a 100 x 80 box
    out = crop_and_resize(box_scene(box=box), box, PreprocessSettings(image_size=60, crop_margin=margin))
    # Horizontally 25/150 of 60 px = 10 px of grey on each side; vertically 25/130 of 60 ~= 11.5 px.
    assert close(out[30, :9], GREY, tol=2) and close(out[30, 51:], GREY, tol=2)
    assert close(out[30, 12:28], RED, tol=2) and close(out[30, 32:48], GREEN, tol=2)
    assert close(out[:10, 30], GREY, tol=2) and close(out[50:, 30], GREY, tol=2)


def test_margin_is_clamped_at_the_photo_edge():
    box = (0, 0, 100, 80)
    out = crop_and_resize(box_scene(box=box), box, PreprocessSettings(image_size=32, crop_margin=50))
    # The margin only extends right and down (there is no photo above or left of the box).
    assert close(out[2, 2], RED, tol=2)
    assert close(out[31, 31], GREY, tol=2)


def test_crop_none_uses_the_whole_photo():
    box = (50, 40, 150, 120)
    out = crop_and_resize(box_scene(box=box), box, PreprocessSettings(image_size=40, crop="none"))
    assert close(out[1, 1], GREY, tol=2) and close(out[20, 15], RED, tol=2) and close(out[20, 25], GREEN, tol=2)


def test_pad_mode_letterboxes_a_wide_box():
    box = (40, 60, 160, 100)  # 120 x 40: three times as wide as high
    out = crop_and_resize(box_scene(box=box), box, PreprocessSettings(image_size=30, crop_margin=0, resize_mode="pad"))
    assert out.shape == (30, 30, 3)
    assert close(out[:9, :], PAD_VALUE, tol=2) and close(out[21:, :], PAD_VALUE, tol=2)
    assert close(out[15, 3], RED, tol=2) and close(out[15, 27], GREEN, tol=2)


def test_stretch_mode_fills_the_square():
    box = (40, 60, 160, 100)
    out = crop_and_resize(box_scene(box=box), box, PreprocessSettings(image_size=30, crop_margin=0))
    assert close(out[0, 3], RED, tol=2) and close(out[29, 27], GREEN, tol=2)


def test_prepare_photo_with_reduced_decode_matches_the_geometry():
    # A large JPEG with a large box: decoded at 1/4 or 1/8 size, the pattern must still land in place.
    box = (200, 160, 1400, 1120)
    scene = box_scene(1600, 1200, box)
    data = cv2.imencode(".jpg", cv2.cvtColor(scene, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    settings = PreprocessSettings(image_size=32, crop_margin=0)
    assert choose_reduction(1200, 960, 32) == 8
    out = prepare_photo(data, box, settings)
    assert close(out[4:28, 2:14], RED, tol=25) and close(out[4:28, 18:30], GREEN, tol=25)
    full = crop_and_resize(decode_image(data), box, settings)
    assert np.abs(out.astype(int) - full.astype(int)).mean() < 6


def test_clamp_bbox():
    assert clamp_bbox((10, 10, 50, 40), 100, 80) == ((10, 10, 50, 40), False)
    assert clamp_bbox((-5, 10, 120, 40), 100, 80) == ((0, 10, 100, 40), True)
    with pytest.raises(ValueError, match="outside"):
        clamp_bbox((150, 10, 200, 40), 100, 80)
    with pytest.raises(ValueError, match="inverted"):
        clamp_bbox((50, 10, 20, 40), 100, 80)


def test_settings_validation():
    with pytest.raises(ValueError, match="crop"):
        PreprocessSettings(crop="centre")
    with pytest.raises(ValueError, match="resize_mode"):
        PreprocessSettings(resize_mode="fit")
    settings = PreprocessSettings(image_size=48, crop="none", crop_margin=4, resize_mode="pad")
    assert PreprocessSettings.from_dict({**settings.to_dict(), "extra": 1}) == settings


# --- hostile input: the pixel limit holds before any pixel is decoded ----------------------------------
from helpers_hostile import bomb_png, header_bombs  # noqa: E402


@pytest.mark.parametrize("width,height", [(16000, 16000), (9000, 7000)])
def test_every_format_is_refused_from_its_header(width, height):
    """Above Pillow's guard (256 MP) and between our limit and Pillow's (63 MP): one line naming the size."""
    for name, data in header_bombs(width, height).items():
        for call in (
            lambda data=data: decode_image(data),
            lambda data=data: prepare_photo(data, None, PreprocessSettings(image_size=32)),
        ):
            with pytest.raises(ImageDecodeError) as info:
                call()
            message = str(info.value)
            assert f"{width * height / 1e6:.1f} megapixels, above the limit of 50.0 megapixels" in message, name
            assert "\n" not in message


def test_avif_and_small_files_are_checked_against_the_limit():
    image = Image.fromarray(halves(48, 32))
    for fmt in ("AVIF", "PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "JPEG2000"):
        data = encode(image, fmt)
        with pytest.raises(ImageDecodeError, match="48x32 = 0.0 megapixels, above the limit"):
            prepare_photo(data, None, PreprocessSettings(image_size=16, max_pixels=1000))
        assert prepare_photo(data, None, PreprocessSettings(image_size=16, max_pixels=48 * 32)).shape == (16, 16, 3)


def test_png_exif_after_the_pixels_is_read_without_decoding():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = bomb_png(40, 20, exif_after_pixels=exif.tobytes()[6:])  # PNG's eXIf holds the bare TIFF block
    assert image_size_of(data) == (20, 40)
    assert decode_image(data).shape == (40, 20, 3)


def test_other_pillow_formats_are_not_opened():
    data = encode(Image.fromarray(halves()), "PPM")
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode_image(data)


def test_pillow_bomb_guard_stays_on():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS >= PreprocessSettings().max_pixels


def test_a_20000px_png_costs_no_memory(tmp_path):
    """In a fresh interpreter: refusing a 20000x20000 PNG (1.2 GB decoded) raises peak RSS by < 100 MB."""
    script = tmp_path / "bomb.py"
    script.write_text(
        textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from helpers_hostile import bomb_png
        from carclf_flavor.images import ImageDecodeError, PreprocessSettings, prepare_photo
        data = bomb_png(20000, 20000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            prepare_photo(data, None, PreprocessSettings(image_size=32))
        except ImageDecodeError as exc:
            print(exc)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    out = subprocess.run(
        [sys.executable, str(script), str(pathlib.Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert out[0] == "image is 400.0 megapixels, above the limit of 50.0 megapixels"
    assert float(out[1]) < 100


def test_opencv_decoder_is_capped_whatever_the_header_says(tmp_path):
    """In a fresh interpreter where carclf_flavor came first: cv2 itself refuses a PNG above the decoders'
    ceiling (as a file whose header lied to the check before it would reach it) without allocating it."""
    script = tmp_path / "cv2_cap.py"
    script.write_text(
        textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from helpers_hostile import bomb_png
        import carclf_flavor.images
        import cv2, numpy as np
        data = np.frombuffer(bomb_png(15000, 14000, color=False), np.uint8)  # 210 megapixels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
            print("decoded")
        except cv2.error as exc:
            print("refused", "CV_IO_MAX_IMAGE_PIXELS" in str(exc))
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """)
    )
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": ""}  # empty: OpenCV itself would abort on it
    out = subprocess.run(
        [sys.executable, str(script), str(pathlib.Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    verdict, grown_mb = out.stdout.split("\n")[:2]
    assert verdict == "refused True"
    assert float(grown_mb) < 50


@pytest.mark.parametrize(
    "value, in_force", [(None, 200_000_000), ("", 200_000_000), ("5000000", 5_000_000), ("9" * 12, 200_000_000)]
)
def test_opencv_cap_keeps_only_a_smaller_setting(value, in_force):
    from carclf_flavor.budget import OPENCV_MAX_PIXELS_ENV_VAR, cap_opencv_decoder

    env = {} if value is None else {OPENCV_MAX_PIXELS_ENV_VAR: value}
    assert cap_opencv_decoder(env) == in_force
    assert env[OPENCV_MAX_PIXELS_ENV_VAR] == str(in_force)


def _gif_frame(width: int, height: int) -> bytes:
    # An image descriptor at (0, 0) with a 2-bit LZW stream that holds only clear + end: no pixel data.
    return b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00"


def test_an_animated_gif_decodes_its_first_frame_only():
    """Frames after the first are never decoded: a later frame claiming 8000x8000 costs nothing."""
    first = encode(Image.fromarray(halves()), "GIF")
    assert first.endswith(b";")
    data = first[:-1] + b"!\xf9\x04\x00\x00\x00\x00\x00" + _gif_frame(8000, 8000) + b";"
    header = read_photo_header(data)
    assert header.stored_size == Image.open(io.BytesIO(first)).size
    pixels = decode_photo(header)
    assert pixels.shape[:2] == halves().shape[:2]
    # A first frame larger than the GIF's screen widens the photo, and the pixel limit sees it before decoding.
    big_first = first[: first.index(b",")] + _gif_frame(8000, 8000) + b";"
    with pytest.raises(ImageDecodeError, match="8000x8000 = 64.0 megapixels, above the limit of 50.0 megapixels"):
        read_photo_header(big_first)
