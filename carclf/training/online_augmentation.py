"""Online augmentation as a few fused tf ops: cheap enough for ``tf.data`` and meant for the training step.

The kinds and strengths of change are those of the Keras preprocessing block ``train`` used before
(RandomFlip, RandomZoom(-0.2, 0), RandomRotation(0.03), RandomColorJitter(0.2, 0.2, (0.3, 0.7)) at
``strength=1``), but instead of one resampling per layer plus an RGB -> HSV -> RGB round trip:

- flip, crop-zoom and rotation are ONE bilinear resampling per image (reflect fill) through one composed
  affine map, written with gathers so that it also compiles under XLA (the training step on GPUs);
- brightness, contrast and saturation are one elementwise pass (saturation as a blend with the luma image,
  which is what an HSV saturation scale does to within a few grey levels, without the colour-space trip).

``train`` runs it inside the training step (``augment_in_train_step``): on a GPU it runs on the GPU and the
``tf.data`` pipeline only streams uint8 batches; the saved inference model never contains it. Randomness is
stateless, seeded by (seed, optimizer step, replica): reproducible, resumable, different on every replica.

Public API:
- ``AugmentationRanges``: the ranges (``for_strength(s)``).
- ``sample_augmentation(batch_size, seed, ranges)``: per-image parameters (flip, zoom, angle, colour).
- ``apply_augmentation(images, params)``: uint8 (B, H, W, 3) -> uint8, same shape.
- ``augment_images(images, seed, ranges)``: both.
- ``augment_in_train_step(model, seed, ranges)``: the model's ``fit`` augments its input batches.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class AugmentationRanges:
    flip_probability: float = 0.5
    zoom: tuple[float, float] = (0.8, 1.0)  # side of the visible centre crop / image side
    max_rotation_degrees: float = 0.03 * 360.0  # Keras RandomRotation(0.03): +-10.8 degrees
    brightness: float = 0.2 * 255.0  # additive, +- on 0..255
    contrast: tuple[float, float] = (0.8, 1.2)  # scale around each image's per-channel mean
    saturation: tuple[float, float] = (0.3 / 0.7, 0.7 / 0.3)  # Keras maps factor f to f / (1 - f)

    @classmethod
    def for_strength(cls, strength: float = 1.0) -> AugmentationRanges:
        s = float(strength)
        low, high = 0.5 - 0.2 * s, 0.5 + 0.2 * s
        return cls(
            zoom=(1.0 - 0.2 * s, 1.0),
            max_rotation_degrees=0.03 * 360.0 * s,
            brightness=0.2 * 255.0 * s,
            contrast=(1.0 - 0.2 * s, 1.0 + 0.2 * s),
            saturation=(low / (1.0 - low), high / (1.0 - high)),
        )


DEFAULT_RANGES = AugmentationRanges()


def sample_augmentation(batch_size, seed, ranges: AugmentationRanges = DEFAULT_RANGES) -> dict:
    """Per-image parameters from a stateless seed (shape [2] integer tensor): same seed, same parameters."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)
    shape = tf.stack([batch_size])

    def uniform(i, low, high):
        return tf.random.stateless_uniform(shape, seeds[i], minval=low, maxval=high)

    # Saturation is drawn the way Keras draws it (uniform in f, then f / (1 - f)), so its spread matches.
    sat_low, sat_high = (r / (1.0 + r) for r in ranges.saturation)
    sat = uniform(5, sat_low, sat_high)
    angle = math.radians(ranges.max_rotation_degrees)
    return {
        "flip": uniform(0, 0.0, 1.0) < ranges.flip_probability,
        "zoom": uniform(1, ranges.zoom[0], ranges.zoom[1]),
        "angle": uniform(2, -angle, angle),
        "brightness": uniform(3, -ranges.brightness, ranges.brightness),
        "contrast": uniform(4, ranges.contrast[0], ranges.contrast[1]),
        "saturation": sat / (1.0 - sat),
    }


def geometry_transforms(params: dict, height, width):
    """(B, 8) projective maps output pixel -> input pixel: centre + zoom * R(angle) * mirror * (out - centre)."""
    import tensorflow as tf

    zoom, angle = params["zoom"], params["angle"]
    mirror = tf.where(params["flip"], -1.0, 1.0)
    cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
    cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
    cos, sin = tf.cos(angle) * zoom, tf.sin(angle) * zoom
    a0, a1 = cos * mirror, -sin
    b0, b1 = sin * mirror, cos
    a2 = cx - a0 * cx - a1 * cy
    b2 = cy - b0 * cx - b1 * cy
    zeros = tf.zeros_like(zoom)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def _reflect(coordinate, size):
    """Reflect coordinates about the outer pixel edges (-0.5 and size - 0.5): "d c b a | a b c d | d c b a"."""
    import tensorflow as tf

    period = 2.0 * size
    t = tf.math.floormod(coordinate + 0.5, period)
    t = tf.where(t > size, period - t, t)
    return tf.clip_by_value(t - 0.5, 0.0, size - 1.0)


def resample_with_gathers(pixels, transforms):
    """Bilinear resampling of float (B, H, W, C) by (B, 8) affine maps, reflect fill, as plain gathers.

    The same result as ``ImageProjectiveTransformV3`` (to 0.004 grey levels), which has no XLA kernel:
    Keras compiles the training step with XLA on GPUs, and this version compiles. On the CPU (no XLA)
    the op is ~4x faster, so it is used there.
    """
    import tensorflow as tf

    shape = tf.shape(pixels)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ys, xs = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
    t = [tf.reshape(transforms[:, i], [-1, 1, 1]) for i in range(6)]
    x_in = _reflect(t[0] * xs + t[1] * ys + t[2], w)
    y_in = _reflect(t[3] * xs + t[4] * ys + t[5], h)
    x0, y0 = tf.floor(x_in), tf.floor(y_in)
    wx, wy = (x_in - x0)[..., None], (y_in - y0)[..., None]
    x0i, y0i = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    x1i, y1i = tf.minimum(x0i + 1, width - 1), tf.minimum(y0i + 1, height - 1)
    flat = tf.reshape(pixels, [-1, channels])
    base = tf.reshape(tf.range(batch) * height * width, [-1, 1, 1])

    def gather(yi, xi):
        return tf.gather(flat, base + yi * width + xi)

    top = gather(y0i, x0i) * (1.0 - wx) + gather(y0i, x1i) * wx
    bottom = gather(y1i, x0i) * (1.0 - wx) + gather(y1i, x1i) * wx
    return top * (1.0 - wy) + bottom * wy


def resample_with_op(pixels, transforms):
    import tensorflow as tf

    shape = tf.shape(pixels)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )


def apply_augmentation(images, params: dict, xla_compatible: bool = False):
    """uint8 (B, H, W, 3) -> uint8: one geometric resampling, then one colour pass, rounded back to uint8."""
    import tensorflow as tf

    shape = tf.shape(images)
    resample = resample_with_gathers if xla_compatible else resample_with_op
    pixels = resample(tf.cast(images, tf.float32), geometry_transforms(params, shape[1], shape[2]))
    per_image = lambda v: tf.reshape(v, [-1, 1, 1, 1])  # noqa: E731
    # Keras' order: brightness, contrast, saturation, each clipped to 0..255.
    pixels = tf.clip_by_value(pixels + per_image(params["brightness"]), 0.0, 255.0)
    mean = tf.reduce_mean(pixels, axis=[1, 2], keepdims=True)
    pixels = tf.clip_by_value((pixels - mean) * per_image(params["contrast"]) + mean, 0.0, 255.0)
    luma = tf.reduce_sum(pixels * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
    pixels = luma + (pixels - luma) * per_image(params["saturation"])
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)


def augment_images(images, seed, ranges: AugmentationRanges = DEFAULT_RANGES, xla_compatible: bool = False):
    import tensorflow as tf

    return apply_augmentation(images, sample_augmentation(tf.shape(images)[0], seed, ranges), xla_compatible)


def _replica_id():
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.constant(0, tf.int64)
    return tf.cast(context.replica_id_in_sync_group, tf.int64)


def step_seed(seed: int, step, replica=None, salt: int = 0):
    """The stateless seed of one training step on one replica."""
    import tensorflow as tf

    replica = _replica_id() if replica is None else tf.cast(replica, tf.int64)
    step = tf.cast(step, tf.int64)
    return tf.stack([tf.constant(int(seed) * 1_000_003 + int(salt), tf.int64), step * 4096 + replica])


def augment_in_train_step(model, seed: int = 0, ranges: AugmentationRanges = DEFAULT_RANGES, salt: int = 0):
    """Make ``model.fit`` augment each input batch inside the (compiled, possibly replicated) training step.

    Only the training step changes (an instance attribute, never saved): ``evaluate``/``predict``, the
    saved model and its weights are untouched. The seed follows the optimizer's step counter, which is
    checkpointed, so a resumed run continues the same sequence of augmentations. ``salt`` tells phases apart.
    """
    import tensorflow as tf

    # Calling it again (a new phase recompiles) replaces the wrapper instead of stacking a second one.
    original = getattr(model, "_carclf_plain_train_step", model.train_step)
    model._carclf_plain_train_step = original
    on_gpu = bool(tf.config.list_logical_devices("GPU"))

    def train_step(data):
        images, *rest = data
        augmented = augment_images(
            images, step_seed(seed, model.optimizer.iterations, salt=salt), ranges, xla_compatible=on_gpu
        )
        return original((augmented, *rest))

    model.train_step = train_step
    return model
