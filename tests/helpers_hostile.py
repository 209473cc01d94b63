"""Hostile inputs shared by the image, preprocess, serving-fuzz tests and the serving benchmark."""
from __future__ import annotations

import struct
import zlib


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 20000, height: int = 20000, color: bool = True, exif_after_pixels: bytes = b"") -> bytes:
    """A valid PNG of width x height black pixels, built without ever holding the pixels in memory.

    20000x20000 RGB compresses to ~1.2 MB: a decompression bomb that would take 1.2 GB once decoded.
    ``exif_after_pixels``: an eXIf payload placed AFTER the pixel data (where Pillow only finds it by
    decoding the image).
    """
    channels = 3 if color else 1
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2 if color else 0, 0, 0, 0)
    row = b"\x00" * (1 + width * channels)  # filter byte 0 + black pixels
    compressor = zlib.compressobj(9)
    parts = []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    chunks = [_png_chunk(b"IHDR", ihdr), _png_chunk(b"IDAT", b"".join(parts))]
    if exif_after_pixels:
        chunks.append(_png_chunk(b"eXIf", exif_after_pixels))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _png_chunk(b"IEND", b"")
