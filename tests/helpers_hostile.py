"""Hostile inputs shared by the image, preprocess, serving-fuzz tests and the serving benchmark."""

from __future__ import annotations

import pathlib
import struct
import threading
import time
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
    for start in range(0, height, 64):
        parts.append(compressor.compress(row * min(64, height - start)))
    parts.append(compressor.flush())
    chunks = [_png_chunk(b"IHDR", ihdr), _png_chunk(b"IDAT", b"".join(parts))]
    if exif_after_pixels:
        chunks.append(_png_chunk(b"eXIf", exif_after_pixels))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _png_chunk(b"IEND", b"")


def _small(fmt: str, mode: str = "RGB", **kwargs) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (16, 16), (10, 20, 30) if mode == "RGB" else 7).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    packed = struct.pack(fmt, *values)
    return data[:offset] + packed + data[offset + len(packed) :]


def header_bombs(width: int = 16000, height: int = 16000) -> dict[str, bytes]:
    """Small files of most accepted formats whose header claims a width x height picture (WebP: <= 16383).

    AVIF is missing: libavif cross-checks the sizes in the container against the AV1 stream.

    Decoding any of them would first allocate the claimed size; a reader that checks the header first
    refuses them at once.
    """
    out = {"png": bomb_png(width, height)}
    jpeg = _small("JPEG")
    sof = jpeg.index(b"\xff\xc0")  # baseline SOF: length(2) precision(1) height(2) width(2)
    out["jpeg"] = _patch(jpeg, sof + 5, ">HH", width, height)
    cmyk = _small("JPEG", "CMYK")
    sof = cmyk.index(b"\xff\xc0")
    out["cmyk_jpeg"] = _patch(cmyk, sof + 5, ">HH", width, height)
    gif = _small("GIF", "L")
    gif = _patch(gif, 6, "<HH", width, height)  # logical screen
    desc = gif.index(b"\x2c", 13)  # image descriptor: left, top, width, height
    out["gif"] = _patch(gif, desc + 5, "<HH", width, height)
    out["bmp"] = _patch(_small("BMP"), 18, "<ii", width, height)
    tiff = _small("TIFF", compression="tiff_deflate")
    out["tiff"] = _patch_tiff_size(tiff, width, height)
    webp = _small("WEBP", lossless=True)
    vp8l = webp.index(b"VP8L") + 8 + 1  # after chunk size and the 0x2f signature: 14 bits w-1, 14 bits h-1
    bits = struct.unpack("<I", webp[vp8l : vp8l + 4])[0]
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    out["webp"] = _patch(webp, vp8l, "<I", bits)
    avif = _small("AVIF")
    ispe = avif.index(b"ispe") + 8  # after version/flags: width, height (u32 each)
    out["avif"] = _patch(avif, ispe, ">II", width, height)
    jp2 = _small("JPEG2000")
    ihdr = jp2.index(b"ihdr") + 4  # height, width (u32 each)
    jp2 = _patch(jp2, ihdr, ">II", height, width)
    siz = jp2.index(b"\xff\x51") + 6  # Lsiz(2) Rsiz(2), then Xsiz, Ysiz
    out["jp2"] = _patch(jp2, siz, ">II", width, height)
    return out


def _patch_tiff_size(data: bytes, width: int, height: int) -> bytes:
    assert data[:2] == b"II"
    ifd = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[ifd : ifd + 2])[0]
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack("<HH", data[entry : entry + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            data = _patch(data, entry + 8, "<H" if kind == 3 else "<I", value)
    return data


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def _status_kb(pid: int, field: str) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak RSS (MB) of one process over a block: the kernel's high-water mark, reset at the start
    (/proc/PID/clear_refs "5"), or where that is not allowed, VmRSS sampled every millisecond."""

    def __init__(self, pid: int):
        self.pid = pid

    def rss_mb(self) -> float:
        return _status_kb(self.pid, "VmRSS") / 1024

    def __enter__(self):
        self.start_mb = self.rss_mb()
        try:
            pathlib.Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.sampler = None
        except OSError:
            self.samples = [self.start_mb]
            self.stop = threading.Event()

            def sample():
                while not self.stop.is_set():
                    self.samples.append(self.rss_mb())
                    time.sleep(0.001)

            self.sampler = threading.Thread(target=sample, daemon=True)
            self.sampler.start()
        return self

    def __exit__(self, *exc):
        if self.sampler is None:
            self.peak_mb = _status_kb(self.pid, "VmHWM") / 1024
        else:
            self.stop.set()
            self.sampler.join()
            self.peak_mb = max(self.samples)
        self.rise_mb = self.peak_mb - self.start_mb
