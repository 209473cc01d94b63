"""The augmentation ops: (S, S, 3) uint8 RGB in, the same shape out, on OpenCV.

``AugmentParams`` says which ops run (in order) and how strong they are; ``augment_image`` applies them with the
random stream ``rng_for(seed, source_row, copy)``, which depends on those three numbers only, so an augmented
image is the same whichever process, partition or retry makes it. Each op draws its random numbers
unconditionally so the stream of one op never depends on the outcome of another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from carclf.augmentation.errors import AugmentError
from carclf_flavor.images import PAD_VALUE

OPS = ("crop", "pad", "flip", "rotate", "brightness", "contrast", "hue", "blur", "cutout")
DEFAULT_OPS = "crop,pad,flip"


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Which ops run (in this order) and how strong they are; every op keeps the image size."""

    ops: tuple = tuple(DEFAULT_OPS.split(","))
    crop_scale: float = 0.8  # crop: random square of side U(crop_scale, 1) * S, resized back to S
    pad_fraction: float = 0.1  # pad: pad by pad_fraction * S (grey) and crop back at a random offset
    flip_prob: float = 0.5  # flip: horizontal mirror with this probability
    rotate_degrees: float = 15.0  # rotate: angle U(-d, d), reflected borders
    brightness: float = 0.2  # brightness: add U(-b, b) * 255
    contrast: float = 0.2  # contrast: scale around the mean by U(1 - c, 1 + c)
    hue_degrees: float = 10.0  # hue: rotate the hue by U(-h, h) degrees
    blur_sigma: float = 1.0  # blur: Gaussian, sigma U(0.1, blur_sigma)
    cutout_fraction: float = 0.25  # cutout: one grey square of side cutout_fraction * S

    def __post_init__(self):
        limits = {
            "crop_scale": (0.05, 1.0),
            "pad_fraction": (0.0, 0.5),
            "flip_prob": (0.0, 1.0),
            "rotate_degrees": (0.0, 180.0),
            "brightness": (0.0, 1.0),
            "contrast": (0.0, 1.0),
            "hue_degrees": (0.0, 180.0),
            "blur_sigma": (0.1, 20.0),
            "cutout_fraction": (0.01, 1.0),
        }
        for name, (lo, hi) in limits.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and lo <= value <= hi):
                raise AugmentError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
        unknown = [op for op in self.ops if op not in OPS]
        if unknown:
            raise AugmentError(f"unknown op(s) {', '.join(map(repr, unknown))}; choose from {', '.join(OPS)}")

    @classmethod
    def parse(cls, ops: str | Sequence[str], **strengths) -> AugmentParams:
        names = [o.strip().lower() for o in (ops.split(",") if isinstance(ops, str) else ops)]
        names = [o for o in names if o]
        if not names:
            raise AugmentError(f"ops is empty; choose from {', '.join(OPS)}")
        ordered = tuple(dict.fromkeys(names))  # applied in the given order, each once
        return cls(ops=ordered, **{k: float(v) for k, v in strengths.items()})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["ops"] = ",".join(self.ops)
        return out


# The op strengths (every field of AugmentParams but ops): what the `augment` step exposes as parameters.
STRENGTHS = tuple(f.name for f in dataclasses.fields(AugmentParams) if f.name != "ops")


def _cv2():
    import cv2

    return cv2


def _crop(img, rng, p: AugmentParams):
    size = img.shape[0]
    side = max(1, int(round(size * rng.uniform(p.crop_scale, 1.0))))
    x = int(rng.integers(0, size - side + 1))
    y = int(rng.integers(0, size - side + 1))
    if side == size:
        return img
    return _cv2().resize(img[y : y + side, x : x + side], (size, size), interpolation=_cv2().INTER_LINEAR)


def _pad(img, rng, p: AugmentParams):
    size = img.shape[0]
    pad = int(round(size * p.pad_fraction))
    dx = int(rng.integers(-pad, pad + 1))
    dy = int(rng.integers(-pad, pad + 1))
    if dx == 0 and dy == 0:
        return img
    # Pad by `pad` on every side and crop an S x S window back at (pad + dx, pad + dy): the same as
    # shifting the image by (-dx, -dy) over a grey canvas, without building the padded array.
    out = np.full_like(img, PAD_VALUE)
    src_x, dst_x = (dx, 0) if dx > 0 else (0, -dx)
    src_y, dst_y = (dy, 0) if dy > 0 else (0, -dy)
    w, h = size - abs(dx), size - abs(dy)
    out[dst_y : dst_y + h, dst_x : dst_x + w] = img[src_y : src_y + h, src_x : src_x + w]
    return out


def _flip(img, rng, p: AugmentParams):
    # cv2.flip is ~10x faster than copying numpy's reversed view of interleaved RGB.
    return _cv2().flip(img, 1) if rng.random() < p.flip_prob else img


def _rotate(img, rng, p: AugmentParams):
    cv2 = _cv2()
    size = img.shape[0]
    angle = rng.uniform(-p.rotate_degrees, p.rotate_degrees)
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2.0, (size - 1) / 2.0), angle, 1.0)
    return cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _lut(img, table):
    return _cv2().LUT(img, np.clip(np.rint(table), 0, 255).astype(np.uint8))


def _brightness(img, rng, p: AugmentParams):
    delta = rng.uniform(-p.brightness, p.brightness) * 255.0
    return _lut(img, np.arange(256, dtype=np.float64) + delta)


def _contrast(img, rng, p: AugmentParams):
    factor = rng.uniform(1.0 - p.contrast, 1.0 + p.contrast)
    mean = float(np.mean(_cv2().mean(img)[:3]))  # cv2.mean: one pass, no float64 copy of the image
    return _lut(img, (np.arange(256, dtype=np.float64) - mean) * factor + mean)


def _hue(img, rng, p: AugmentParams):
    cv2 = _cv2()
    # HSV_FULL spreads the hue over 0..255 (1.4 degrees a step) instead of 0..179.
    shift = int(round(rng.uniform(-p.hue_degrees, p.hue_degrees) * 256.0 / 360.0))
    if shift == 0:
        return img
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int16) + shift) % 256).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _blur(img, rng, p: AugmentParams):
    sigma = rng.uniform(0.1, p.blur_sigma)
    return _cv2().GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma)


def _cutout(img, rng, p: AugmentParams):
    size = img.shape[0]
    side = max(1, int(round(size * p.cutout_fraction)))
    cx, cy = int(rng.integers(0, size)), int(rng.integers(0, size))
    x1, y1 = max(0, cx - side // 2), max(0, cy - side // 2)
    out = img.copy()
    out[y1 : min(size, y1 + side), x1 : min(size, x1 + side)] = PAD_VALUE
    return out


_OP_FUNCS: dict[str, Callable] = {
    "crop": _crop,
    "pad": _pad,
    "flip": _flip,
    "rotate": _rotate,
    "brightness": _brightness,
    "contrast": _contrast,
    "hue": _hue,
    "blur": _blur,
    "cutout": _cutout,
}


def rng_for(seed: int, source_row: int, copy: int) -> np.random.Generator:
    """The random stream of one augmented image: depends on nothing but these three numbers."""
    return np.random.default_rng([int(seed), int(source_row), int(copy)])


def augment_image(image: np.ndarray, params: AugmentParams, rng: np.random.Generator) -> np.ndarray:
    out = image
    for op in params.ops:
        out = _OP_FUNCS[op](out, rng, params)
    return np.ascontiguousarray(out)


def use_single_threaded_opencv() -> None:
    # Spark runs one task per core: OpenCV's own thread pool would only oversubscribe the cores.
    _cv2().setNumThreads(1)
