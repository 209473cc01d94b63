"""Image decoding and crop/resize: the ONE preprocessing used to build training data and to serve.

Public API:
- ``PreprocessSettings``: image size, crop mode, crop margin, resize mode, pixel limit (saved with
  every HDF5 file and every model as ``preprocessing.json``).
- ``decode_image(data, ...)``: encoded bytes -> RGB uint8 array (EXIF orientation applied; grayscale,
  CMYK, alpha, palette and 16-bit inputs normalised), optionally decoded at reduced resolution.
- ``crop_and_resize(image, bbox, settings, source_size)``: bbox crop with margin, then stretch/pad resize.
- ``preprocess_image(data, bbox, settings)``: decode -> crop -> resize, picking the cheapest decode
  resolution that still covers the crop. Training data and served requests both go through it.

Only numpy, OpenCV and Pillow are imported: this module ships inside every saved model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

CROP_MODES = ("bbox", "none")
RESIZE_MODES = ("stretch", "pad")
DEFAULT_MAX_PIXELS = 50_000_000
# Letterbox fill for resize_mode="pad": mid grey stays close to zero after mean subtraction.
PAD_VALUE = 128

# EXIF orientations 5-8 swap width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112

# The formats a photo may come in. Image.open is told these only, so a request cannot reach Pillow's other
# decoders (EPS would start Ghostscript; ICO/ICNS/DCX carry several images of their own sizes). Phones' MPO
# files (a JPEG plus extra pictures) open through the JPEG entry and report format "MPO".
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "AVIF", "JPEG2000")

# Pillow's own bomb guard stays on as a second line behind ``max_pixels`` (checked from the header before any
# pixel is decoded): Pillow's default limit is kept, and any path that reaches a Pillow decoder directly is
# still refused above twice that. Leaving it at None let a 20000x20000 PNG be decoded in full (2.8 GB).
if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > 2 * DEFAULT_MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = 2 * DEFAULT_MAX_PIXELS


class ImageDecodeError(ValueError):
    """An input that is not a usable image (empty, corrupt, truncated, too large, unknown format)."""


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
    image_size: int = 224
    crop: str = "bbox"
    crop_margin: int = 16
    resize_mode: str = "stretch"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if int(self.image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {self.crop!r}")
        if int(self.crop_margin) < 0:
            raise ValueError(f"crop_margin must be >= 0, got {self.crop_margin}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if int(self.max_pixels) < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PreprocessSettings:
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in values.items():
            if name not in known:
                continue
            if isinstance(value, bytes):
                value = value.decode()
            if name in ("image_size", "crop_margin", "max_pixels"):
                value = int(value)
            else:
                value = str(value)
            kwargs[name] = value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _bomb_error(exc: Exception, max_pixels: int) -> ImageDecodeError:
    """Pillow's DecompressionBombError as our one line (its message carries the pixel count)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too large"
    limit = min(int(max_pixels), 2 * int(Image.MAX_IMAGE_PIXELS or max_pixels))
    return ImageDecodeError(f"image is {size}, above the limit of {limit / 1e6:.1f} megapixels")


def _read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open lazily (header only) so size, format and mode are known before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit speaks first
            header = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, max_pixels) from None
    except Exception as exc:  # PIL raises several types for non-images
        raise ImageDecodeError(
            f"not a recognised image format ({type(exc).__name__}; accepted: {', '.join(ACCEPTED_FORMATS)})"
        ) from None
    return header


def _check_pixel_limit(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:.1f} megapixels"
        )


def _png_exif_chunk(data: bytes) -> bytes | None:
    """The payload of a PNG's eXIf chunk, found by walking the chunk headers (no pixel data is inflated).

    Needed because Pillow's PngImageFile.getexif() decodes the WHOLE image when the chunk does not come
    before the pixel data (or does not exist): for a 20000x20000 PNG that alone took 1.5 GB.
    """
    pos = 8  # after the signature
    end = len(data)
    while pos + 8 <= end:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"eXIf":
            return data[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            return None
        pos += 12 + length
    return None


def _exif_orientation(header: Image.Image, data: bytes | None = None) -> int:
    """EXIF orientation (1-8) from the metadata alone; never decodes pixels."""
    try:
        if header.format == "PNG":
            chunk = _png_exif_chunk(data) if data is not None else None
            if chunk is not None:
                header.info["exif"] = chunk if chunk.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + chunk
            # The base class reads info (eXIf, raw profile, XMP) only; PngImageFile's override would load().
            exif = Image.Image.getexif(header)
        else:
            exif = header.getexif()
        return int(exif.get(_EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block must not make a good photo unreadable
        return 1


def _to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """OpenCV's BGR/BGRA/gray in 8 or 16 bit -> RGB uint8; transparency is composited over white."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    channels = array.shape[2]
    if channels == 1:
        return cv2.cvtColor(array[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 2:  # gray + alpha
        gray, alpha = array[:, :, 0], array[:, :, 1]
        array = np.dstack([gray, gray, gray, alpha])
        channels = 4
    if channels == 4:
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        bgr = array[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return cv2.cvtColor(np.rint(bgr).astype(np.uint8), cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(array[:, :, :3], cv2.COLOR_BGR2RGB)


def _decode_with_pil(header: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(header)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.uint32)
        # 16-bit data: keep the top 8 bits, as OpenCV does.
        return _to_rgb_uint8((array >> 8).clip(0, 255).astype(np.uint8))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_image(data: bytes, reduce: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array of shape (H, W, 3), EXIF orientation applied.

    ``reduce`` (1, 2, 4 or 8) decodes a JPEG at 1/reduce of its size through libjpeg's DCT scaling,
    which is several times faster than a full decode followed by a resize. Other formats ignore it.
    Raises ``ImageDecodeError`` for empty, corrupt, truncated or over-large inputs.
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image (0 bytes)")
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    header = _read_header(data, max_pixels)
    width, height = header.size
    _check_pixel_limit(width, height, max_pixels)
    buffer = np.frombuffer(data, dtype=np.uint8)
    fmt = header.format
    try:
        if fmt in ("JPEG", "MPO") and header.mode in ("RGB", "L"):
            # cv2 applies EXIF orientation itself for IMREAD_COLOR and the reduced flags.
            flag = _REDUCED_FLAGS.get(int(reduce), cv2.IMREAD_COLOR)
            decoded = cv2.imdecode(buffer, flag)
            if decoded is None:
                raise ImageDecodeError("corrupt or truncated JPEG")
            image = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
            # libjpeg fills a truncated stream with grey and only warns: catch it with PIL's strict check.
            _check_complete_jpeg(data)
        elif fmt in ("PNG", "WEBP", "BMP", "TIFF") and header.mode not in ("CMYK", "P", "PA", "I", "F"):
            decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
            if decoded is None:
                raise ImageDecodeError(f"corrupt or truncated {fmt}")
            image = _to_rgb_uint8(decoded)
            orientation = _exif_orientation(header, data)
            if orientation != 1:
                image = _apply_orientation(image, orientation)
        else:  # CMYK JPEG, palette PNG, GIF, ...: Pillow handles the colour conversions correctly
            header.load()
            image = _decode_with_pil(header)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, max_pixels) from None
    except (OSError, SyntaxError, ValueError, cv2.error) as exc:
        raise ImageDecodeError(f"corrupt or truncated {fmt or 'image'} ({exc})") from None
    return image


def _check_complete_jpeg(data: bytes) -> None:
    # A JPEG ends with the EOI marker; a missing one means the file was cut off.
    tail = data[-16:].rstrip(b"\x00")
    if not tail.endswith(b"\xff\xd9"):
        raise ImageDecodeError("truncated JPEG (no end-of-image marker)")


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: np.transpose(a, (1, 0, 2)),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.rot90(a, k=1)[::-1, ::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(image)) if op else image


def clamp_bbox(bbox: Sequence[int], width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
    """Clamp (x1, y1, x2, y2) to the image; returns the box and whether it had to be changed.

    Raises ValueError when nothing of the box lies inside the image or it is inverted.
    """
    x1, y1, x2, y2 = (int(v) for v in bbox)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbox {tuple(bbox)} is empty or inverted (need x1 < x2 and y1 < y2)")
    cx1, cy1 = max(0, x1), max(0, y1)
    cx2, cy2 = min(width, x2), min(height, y2)
    if cx2 <= cx1 or cy2 <= cy1:
        raise ValueError(f"bbox {tuple(bbox)} lies outside the {width}x{height} image")
    clamped = (cx1, cy1, cx2, cy2)
    return clamped, clamped != (x1, y1, x2, y2)


def crop_region(bbox, width: int, height: int, settings: PreprocessSettings) -> tuple[int, int, int, int]:
    """The region of the source image (in source pixels) that ends up in the output."""
    if settings.crop == "none" or bbox is None:
        return 0, 0, width, height
    (x1, y1, x2, y2), _ = clamp_bbox(bbox, width, height)
    m = int(settings.crop_margin)
    return max(0, x1 - m), max(0, y1 - m), min(width, x2 + m), min(height, y2 + m)


def crop_and_resize(
    image: np.ndarray,
    bbox: Sequence[int] | None,
    settings: PreprocessSettings,
    source_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Crop ``image`` to ``bbox`` (+ margin, clamped) and resize to (S, S, 3).

    ``bbox`` and ``source_size`` (width, height) are in source pixels; ``image`` may have been decoded
    at a fraction of that size (reduced JPEG decoding), so the crop is scaled accordingly.
    """
    height, width = image.shape[:2]
    src_w, src_h = source_size or (width, height)
    x1, y1, x2, y2 = crop_region(bbox, src_w, src_h, settings)
    sx, sy = width / src_w, height / src_h
    px1, py1 = int(np.floor(x1 * sx)), int(np.floor(y1 * sy))
    px2, py2 = max(px1 + 1, int(np.ceil(x2 * sx))), max(py1 + 1, int(np.ceil(y2 * sy)))
    region = image[py1:py2, px1:px2]
    size = int(settings.image_size)
    if settings.resize_mode == "pad":
        h, w = region.shape[:2]
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        region = cv2.copyMakeBorder(
            region, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
        )
    h, w = region.shape[:2]
    interpolation = cv2.INTER_AREA if (h > size or w > size) else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(region, (size, size), interpolation=interpolation))


def choose_reduction(region_w: int, region_h: int, image_size: int) -> int:
    """Largest DCT reduction (1, 2, 4, 8) that keeps the crop at least ``image_size`` on its short side."""
    short = min(region_w, region_h)
    for factor in (8, 4, 2):
        if short / factor >= image_size:
            return factor
    return 1


def image_size_of(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation, read from the header only."""
    header = _read_header(data, max_pixels)
    width, height = header.size
    if header.format in ("JPEG", "MPO", "PNG", "WEBP", "TIFF") and (
        _exif_orientation(header, data) in _TRANSPOSING_ORIENTATIONS
    ):
        width, height = height, width
    return width, height


def preprocess_image(data: bytes, bbox: Sequence[int] | None, settings: PreprocessSettings) -> np.ndarray:
    """Encoded bytes -> (S, S, 3) RGB uint8, exactly as the training data was built.

    Decodes JPEGs at reduced resolution when the crop region allows it (libjpeg DCT scaling).
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image (0 bytes)")
    width, height = image_size_of(bytes(data), settings.max_pixels)
    _check_pixel_limit(width, height, settings.max_pixels)
    x1, y1, x2, y2 = crop_region(bbox, width, height, settings)
    reduce = choose_reduction(x2 - x1, y2 - y1, int(settings.image_size))
    image = decode_image(bytes(data), reduce=reduce, max_pixels=settings.max_pixels)
    return crop_and_resize(image, bbox, settings, source_size=(width, height))
