"""Pixel budgets: what decoding photos may cost one request, and one server process at a time.

A photo's encoded size says little about its decoded size: a 7000x7000 PNG of flat colour is 143 KB and
decodes to 147 MB of RGB in 1.6 s. The per-photo limit (``PreprocessSettings.max_pixels``) and the request's
byte limit still admit hundreds of such photos in one request, so two budgets more are counted in pixels,
both from each photo's header (``carclf_flavor.images.read_photo_header``: no pixel decoded):

- per request, ``RequestPixels``: the sum of the photos' pixels (as stored in the files); a request over it
  is refused as a whole, naming the row where the sum crosses it, before any photo is decoded;
- per process, ``DecodingPixels``: the pixels being decoded at once, by all requests together; a decode waits
  until the photos decoding before it have finished, so parallel requests cannot multiply the memory.

Both are set like the other request limits (``carclf_flavor.pyfunc.RequestLimits``): an environment variable,
else the model_config key, else the default. Only the standard library is imported; importing this module
caps OpenCV's decoder (``cap_opencv_decoder``), so it comes before any ``import cv2``.
"""

from __future__ import annotations

import contextlib
import os
import threading

MAX_REQUEST_PIXELS_ENV_VAR = "CARCLF_MAX_REQUEST_PIXELS"
DEFAULT_MAX_REQUEST_PIXELS = 200_000_000
MAX_DECODING_PIXELS_ENV_VAR = "CARCLF_MAX_DECODING_PIXELS"
# Two photos at the default per-photo limit (50 MP) may decode at once: about 300 MB of RGB in flight.
DEFAULT_MAX_DECODING_PIXELS = 100_000_000


# The decoders' own ceiling, behind the per-photo limit checked from the header: what one decode may allocate
# whatever a file claims (3 bytes a pixel: 600 MB). Pillow refuses above twice its MAX_IMAGE_PIXELS
# (carclf_flavor.images sets half of this); OpenCV reads its ceiling from the environment once, when it is
# first imported, and its default is 1 gigapixel (3 GB).
DECODER_MAX_PIXELS = 200_000_000
OPENCV_MAX_PIXELS_ENV_VAR = "OPENCV_IO_MAX_IMAGE_PIXELS"


def cap_opencv_decoder(env=None) -> int:
    """Set $OPENCV_IO_MAX_IMAGE_PIXELS to ``DECODER_MAX_PIXELS`` unless it holds a smaller positive count.

    Effective only before cv2 is first imported in the process (this package is imported first in a served
    model); an empty or malformed value would make OpenCV abort the process, so it is replaced too.
    Returns the value in force.
    """
    env = os.environ if env is None else env
    raw = str(env.get(OPENCV_MAX_PIXELS_ENV_VAR, "")).strip()
    if raw.isdigit() and 0 < int(raw) <= DECODER_MAX_PIXELS:
        return int(raw)
    env[OPENCV_MAX_PIXELS_ENV_VAR] = str(DECODER_MAX_PIXELS)
    return DECODER_MAX_PIXELS


cap_opencv_decoder()


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


class RequestPixels:
    """The running sum of one request's photo pixels; ``add`` raises ``ValueError`` once it crosses ``budget``."""

    def __init__(self, budget: int, source: str = MAX_REQUEST_PIXELS_ENV_VAR):
        self.budget = int(budget)
        self.source = source
        self.total = 0

    def add(self, row: int, pixels: int) -> None:
        self.total += int(pixels)
        if self.total > self.budget:
            raise ValueError(
                f"request's images add up to {megapixels(self.total)} by row {row}, above the budget of "
                f"{megapixels(self.budget)} per request ({self.source}); send fewer or smaller photos"
            )


class DecodingPixels:
    """A counting semaphore over pixels being decoded in this process: at most ``capacity`` at once.

    A photo larger than the capacity is charged the whole capacity (it then decodes alone) rather than
    waiting forever. Holders never wait for anything else while holding, so waiting cannot deadlock.
    """

    def __init__(self, capacity: int = DEFAULT_MAX_DECODING_PIXELS):
        self._condition = threading.Condition()
        self.capacity = int(capacity)
        self.in_use = 0
        self.peak = 0  # the most pixels held at once since the last ``reset_peak``: what tests and benches read

    def set_capacity(self, capacity: int) -> None:
        with self._condition:
            self.capacity = int(capacity)
            self._condition.notify_all()

    def reset_peak(self) -> None:
        with self._condition:
            self.peak = self.in_use

    @contextlib.contextmanager
    def hold(self, pixels: int):
        with self._condition:
            charge = max(0, min(int(pixels), self.capacity))
            self._condition.wait_for(lambda: self.in_use + charge <= self.capacity)
            self.in_use += charge
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._condition:
                self.in_use -= charge
                self._condition.notify_all()


# The one per process: every decode of a served photo (pyfunc, demo) goes through it.
PROCESS_DECODING = DecodingPixels()
