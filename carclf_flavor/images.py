"""The ONE photo preparation of carclf: what builds the training data is what serves (shipped in every model).

Public API:
- ``PreprocessSettings``: image size, crop mode, crop margin, resize mode, pixel limit (saved with
  every HDF5 file and every model as ``preprocessing.json``).
- ``prepare_photo(photo, bbox, settings)``: encoded bytes, a ``pathlib.Path`` or a uint8 RGB array -> the
  (S, S, 3) uint8 pixels the network sees. The ``preprocess`` step (training data) and ``CarClassifier``
  (``predict``, the served pyfunc, the demo page) call it for every photo; nothing else prepares photos.
- ``read_photo_header`` / ``decode_region``: its two halves, for a caller that needs the photo's region at
  another size (the demo's heatmap picture); ``decode_image``: a whole photo as RGB; ``crop_and_resize``,
  ``clamp_bbox``, ``crop_region``, ``choose_reduction``, ``image_size_of``: the geometry it uses.

One header read: Pillow opens the bytes once, lazily (``read_photo_header``). Format, size, pixel limit and
EXIF orientation all come from that one parse, before any pixel is decoded, and the pixels are decoded from
that same open image (JPEG, and every format OpenCV does not read well) or by OpenCV from the same bytes
(PNG, WebP, BMP, TIFF in plain modes).

Reduced JPEG decoding: ``Image.draft`` makes libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain. The
scale is the largest that keeps the crop region's short side >= the output size (``choose_reduction``), so
the final resize still only shrinks. It gives the same pixels as OpenCV's ``IMREAD_REDUCED_COLOR_*`` (the
previous implementation) and differs from a full decode followed by the same resize by about one level on
average. Training data and served photos go through the same call, so there is no train/serve skew.

Bounding-box policy (the same for training data and serving, for bytes and arrays):
- the box is used, and so validated, only when ``settings.crop == "bbox"``; with ``crop="none"`` (or no box)
  the whole photo is used and any box given is ignored, whatever its values;
- with ``crop="bbox"`` the box (x1, y1, x2, y2; source pixels of the photo as displayed, i.e. after EXIF
  orientation; exclusive end) is clamped to the photo when it lies partly outside it;
- a box that is empty or inverted (x2 <= x1 or y2 <= y1), or that lies wholly outside the photo, raises
  ``BoundingBoxError`` (an ``ImageDecodeError``) naming the box, before the photo is decoded: ``preprocess``
  skips and lists that photo, the served model answers that row with the error;
- ``crop_margin`` pixels are then added around the (clamped) box, clamped to the photo again.

Only numpy, OpenCV, Pillow and ``carclf_flavor.budget`` are imported: this module ships inside every saved model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

# budget caps OpenCV's decoder when imported, which must come before cv2's first import.
from carclf_flavor.budget import DECODER_MAX_PIXELS, OPENCV_MAX_PIXELS_ENV_VAR, DecodingPixels, megapixels  # isort: skip

import cv2
import numpy as np
from PIL import Image

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
if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > DECODER_MAX_PIXELS // 2:
    Image.MAX_IMAGE_PIXELS = DECODER_MAX_PIXELS // 2  # Pillow refuses above twice this


class ImageDecodeError(ValueError):
    """An input that is not a usable image (empty, corrupt, truncated, too large, unknown format)."""


class BoundingBoxError(ImageDecodeError):
    """A box that ``crop="bbox"`` cannot use: empty, inverted or wholly outside the photo (the message names it)."""


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


# Formats whose files can carry an EXIF orientation tag Pillow reads from the header.
_EXIF_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "TIFF", "AVIF")


@dataclasses.dataclass
class PhotoHeader:
    """One parse of a photo: what is known before any pixel is decoded. Decode it once (``decode_photo``)."""

    data: bytes
    image: Image.Image  # opened lazily: header parsed, pixels not yet decoded
    format: str
    stored_size: tuple[int, int]  # (width, height) as stored in the file
    orientation: int  # EXIF orientation 1-8

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, i.e. after EXIF orientation: the frame boxes refer to."""
        width, height = self.stored_size
        return (height, width) if self.orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def _as_bytes(data) -> bytes:
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty image (0 bytes)")
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    return data


def read_photo_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> PhotoHeader:
    """Open ``data`` once, lazily: format, size, pixel limit and EXIF orientation, no pixel decoded.

    Raises ``ImageDecodeError`` for empty input, unknown formats and photos above ``max_pixels``.
    """
    data = _as_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit speaks first
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, max_pixels) from None
    except Exception as exc:  # PIL raises several types for non-images
        raise ImageDecodeError(
            f"not a recognised image format ({type(exc).__name__}; accepted: {', '.join(ACCEPTED_FORMATS)})"
        ) from None
    width, height = image.size
    _check_pixel_limit(width, height, max_pixels)
    orientation = _exif_orientation(image, data) if image.format in _EXIF_FORMATS else 1
    return PhotoHeader(data, image, image.format, (width, height), orientation)


def image_size_of(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation, read from the header only."""
    return read_photo_header(data, max_pixels).size


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
    if channels == 3 and array.flags.c_contiguous and array.flags.writeable:
        # In place: a 7000x7000 photo is 147 MB of pixels; a converted copy would hold them twice at once.
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB, dst=array)
    return cv2.cvtColor(array[:, :, :3], cv2.COLOR_BGR2RGB)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image in any mode -> RGB uint8; transparency is composited over white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.uint32)
        # 16-bit data: keep the top 8 bits, as OpenCV does.
        return _to_rgb_uint8((array >> 8).clip(0, 255).astype(np.uint8))
    elif image.mode == "L":
        return cv2.cvtColor(np.asarray(image, dtype=np.uint8), cv2.COLOR_GRAY2RGB)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def decode_photo(header: PhotoHeader, reduce: int = 1) -> np.ndarray:
    """The pixels of an opened photo as RGB uint8 (H, W, 3), EXIF orientation applied.

    ``reduce`` (1, 2, 4 or 8) decodes a JPEG at 1/reduce of its size (``Image.draft``: libjpeg's DCT
    scaling, several times faster than a full decode and a resize); other formats ignore it. Consumes the
    header's open image: decode a header once.
    """
    image, data, fmt = header.image, header.data, header.format
    try:
        if fmt in ("JPEG", "MPO"):
            # libjpeg fills a truncated stream with grey and only warns: refuse it before decoding.
            _check_complete_jpeg(data)
            if int(reduce) > 1:
                width, height = header.stored_size
                image.draft("RGB", (max(1, width // int(reduce)), max(1, height // int(reduce))))
            image.load()
            pixels = _pil_to_rgb(image)
        elif fmt in ("PNG", "WEBP", "BMP", "TIFF") and image.mode not in ("CMYK", "P", "PA", "I", "F"):
            decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
            if decoded is None:
                raise ImageDecodeError(f"corrupt or truncated {fmt}")
            pixels = _to_rgb_uint8(decoded)
        else:  # palette PNG, GIF, AVIF, JPEG 2000, ...: Pillow handles the colour conversions correctly
            image.load()
            pixels = _pil_to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, DEFAULT_MAX_PIXELS) from None
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE" in str(exc):  # OpenCV's own ceiling (carclf_flavor.budget), before it allocated
            raise ImageDecodeError(
                f"{fmt} is above the decoder's limit of {megapixels(DECODER_MAX_PIXELS)} ({OPENCV_MAX_PIXELS_ENV_VAR})"
            ) from None
        raise ImageDecodeError(f"corrupt or truncated {fmt or 'image'} ({str(exc).strip().splitlines()[-1]})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated {fmt or 'image'} ({exc})") from None
    return _apply_orientation(pixels, header.orientation)


def decode_image(data: bytes, reduce: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3), EXIF orientation applied (``read_photo_header`` + ``decode_photo``).

    Raises ``ImageDecodeError`` for empty, corrupt, truncated or over-large inputs.
    """
    return decode_photo(read_photo_header(data, max_pixels), reduce)


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

    Raises ``BoundingBoxError`` when the box is empty or inverted, or nothing of it lies inside the image.
    """
    x1, y1, x2, y2 = (int(v) for v in bbox)
    if x2 <= x1 or y2 <= y1:
        raise BoundingBoxError(f"bbox {tuple(bbox)} is empty or inverted (need x1 < x2 and y1 < y2)")
    cx1, cy1 = max(0, x1), max(0, y1)
    cx2, cy2 = min(width, x2), min(height, y2)
    if cx2 <= cx1 or cy2 <= cy1:
        raise BoundingBoxError(f"bbox {tuple(bbox)} lies outside the {width}x{height} image")
    clamped = (cx1, cy1, cx2, cy2)
    return clamped, clamped != (x1, y1, x2, y2)


def box_used(
    bbox: Sequence[int] | None, width: int, height: int, settings: PreprocessSettings
) -> tuple[tuple[int, int, int, int], bool]:
    """The module's bbox policy: (the box the crop uses, whether it was clamped). The whole photo when
    ``crop="none"`` or no box (the box is then not looked at); raises ``BoundingBoxError`` for a bad box."""
    if settings.crop == "none" or bbox is None:
        return (0, 0, int(width), int(height)), False
    return clamp_bbox(bbox, width, height)


def _with_margin(box, width: int, height: int, settings: PreprocessSettings) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    if settings.crop == "none":
        return x1, y1, x2, y2
    m = int(settings.crop_margin)
    return max(0, x1 - m), max(0, y1 - m), min(width, x2 + m), min(height, y2 + m)


def crop_region(bbox, width: int, height: int, settings: PreprocessSettings) -> tuple[int, int, int, int]:
    """The region of the source image (in source pixels) that ends up in the output: box + margin, clamped."""
    box, _ = box_used(bbox, width, height, settings)
    return _with_margin(box, width, height, settings)


def _cut(image: np.ndarray, region, source_size: tuple[int, int]) -> np.ndarray:
    """``region`` (source pixels) of ``image``, which may have been decoded at a fraction of ``source_size``."""
    height, width = image.shape[:2]
    src_w, src_h = source_size
    x1, y1, x2, y2 = region
    sx, sy = width / src_w, height / src_h
    px1, py1 = int(np.floor(x1 * sx)), int(np.floor(y1 * sy))
    px2, py2 = max(px1 + 1, int(np.ceil(x2 * sx))), max(py1 + 1, int(np.ceil(y2 * sy)))
    return image[py1:py2, px1:px2]


def _to_square(region: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
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


def crop_and_resize(
    image: np.ndarray,
    bbox: Sequence[int] | None,
    settings: PreprocessSettings,
    source_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Crop ``image`` to ``bbox`` (+ margin, clamped; the module's bbox policy) and resize to (S, S, 3).

    ``bbox`` and ``source_size`` (width, height) are in source pixels; ``image`` may have been decoded
    at a fraction of that size (reduced JPEG decoding), so the crop is scaled accordingly.
    """
    height, width = image.shape[:2]
    source_size = source_size or (width, height)
    region = crop_region(bbox, *source_size, settings)
    return _to_square(_cut(image, region, source_size), settings)


def choose_reduction(region_w: int, region_h: int, image_size: int) -> int:
    """Largest DCT reduction (1, 2, 4, 8) that keeps the crop at least ``image_size`` on its short side."""
    short = min(region_w, region_h)
    for factor in (8, 4, 2):
        if short / factor >= image_size:
            return factor
    return 1


def decoded_pixels(header: PhotoHeader, reduce: int = 1) -> int:
    """The pixels ``decode_photo(header, reduce)`` holds: a JPEG decodes at 1/reduce per side, the rest whole."""
    width, height = header.stored_size
    if header.format in ("JPEG", "MPO") and int(reduce) > 1:
        return max(1, width // int(reduce)) * max(1, height // int(reduce))
    return width * height


def decode_region(
    header: PhotoHeader, region: tuple[int, int, int, int], min_side: int, decoding: DecodingPixels | None = None
) -> np.ndarray:
    """``region`` (displayed source pixels) of the photo, decoded at the cheapest JPEG scale that keeps the
    region's short side >= ``min_side`` (so the region comes back at 1, 1/2, 1/4 or 1/8 of its source size).

    ``decoding``: the process's budget of pixels decoding at once (``carclf_flavor.budget``); the decode waits
    for its share of it, and the region is copied out before the share is released.
    """
    x1, y1, x2, y2 = region
    reduce = choose_reduction(x2 - x1, y2 - y1, int(min_side))
    if decoding is None:
        return _cut(decode_photo(header, reduce), region, header.size)
    with decoding.hold(decoded_pixels(header, reduce)):
        return np.array(_cut(decode_photo(header, reduce), region, header.size))


def prepare_photo(
    photo,
    bbox: Sequence[int] | None,
    settings: PreprocessSettings,
    *,
    return_box: bool = False,
    decoding: DecodingPixels | None = None,
):
    """A photo -> the (S, S, 3) RGB uint8 pixels the network sees; training data and serving both call this.

    ``photo``: encoded bytes (bytearray/memoryview too), a ``pathlib.Path`` to read them from, a
    ``PhotoHeader`` already read from them (not yet decoded), or a uint8 RGB array (H, W, 3). ``bbox``: (x1, y1, x2, y2) in source pixels or None; used as the module docstring's
    bbox policy says (only with ``crop="bbox"``; clamped; a bad box raises ``BoundingBoxError`` naming it).
    The header is parsed once (``read_photo_header``), the box checked before any pixel is decoded, and a
    JPEG decoded at the reduced scale the crop allows (``decode_region``), then cropped and resized.

    ``return_box=True`` returns ``(pixels, box, clamped)``: the box the crop used (the whole photo when
    ``crop="none"`` or no box) and whether it was clamped to the photo. Raises ``ImageDecodeError`` with a
    one-line message for anything unusable. ``decoding``: see ``decode_region`` (a server's process budget;
    the crop and resize run inside the decode's share, so its full-size pixels are gone when it is released).
    """
    if isinstance(photo, np.ndarray):
        if photo.dtype != np.uint8:
            raise ImageDecodeError(f"arrays must be uint8 RGB, got dtype {photo.dtype}")
        if photo.ndim != 3 or photo.shape[2] != 3:
            raise ImageDecodeError(f"arrays must have shape (H, W, 3), got {photo.shape}")
        height, width = photo.shape[:2]
        if width * height > settings.max_pixels:
            raise ImageDecodeError(f"image is {width}x{height}, above the pixel limit {settings.max_pixels}")
        box, clamped = box_used(bbox, width, height, settings)
        pixels = _to_square(_cut(photo, _with_margin(box, width, height, settings), (width, height)), settings)
    else:
        if isinstance(photo, os.PathLike):
            try:
                with open(photo, "rb") as file:
                    photo = file.read()
            except OSError as exc:
                raise ImageDecodeError(f"cannot read file ({exc.strerror or exc})") from None
        header = photo if isinstance(photo, PhotoHeader) else read_photo_header(photo, settings.max_pixels)
        width, height = header.size
        box, clamped = box_used(bbox, width, height, settings)
        region = _with_margin(box, width, height, settings)
        if decoding is None:
            pixels = _to_square(decode_region(header, region, int(settings.image_size)), settings)
        else:
            reduce = choose_reduction(region[2] - region[0], region[3] - region[1], int(settings.image_size))
            with decoding.hold(decoded_pixels(header, reduce)):
                pixels = _to_square(decode_region(header, region, int(settings.image_size)), settings)
    return (pixels, box, clamped) if return_box else pixels
