"""Online augmentation: the same kinds and strengths of change as the Keras layers it replaces, measured on
images (flip rate, zoom range, rotation range, brightness, contrast, saturation); inside the training step
only; never in the saved inference model."""

import numpy as np
import pytest

from benchmarks.bench_train import keras_layers_augmenter
from carclf.training.online_augmentation import (
    AugmentationRanges,
    augment_images,
    augment_in_train_step,
    geometry_transforms,
    resample_with_gathers,
    resample_with_op,
    sample_augmentation,
)

N = 400
S = 48


def _ours(images, seed=0):
    import tensorflow as tf

    return augment_images(tf.constant(images), tf.constant([seed, 1], tf.int64)).numpy()


def _keras(images, seed=0):
    import tensorflow as tf

    out = keras_layers_augmenter(seed)(tf.cast(tf.constant(images), tf.float32), training=True)
    return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)


def _batch(image):
    return np.repeat(image[None], N, axis=0).astype(np.uint8)


def _luma(images):
    return images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def measure_flip(augment):
    image = np.full((S, S, 3), 40)
    image[:, S // 2 :] = 200
    out = _luma(augment(_batch(image)))
    return out[:, :, : S // 2].mean(axis=(1, 2)) > out[:, :, S // 2 :].mean(axis=(1, 2))


def _masks(out):
    luma = _luma(out)
    low, high = luma.min(axis=(1, 2), keepdims=True), luma.max(axis=(1, 2), keepdims=True)
    return luma > (low + high) / 2


def measure_zoom(augment):
    """Apparent size of a centred 16 px square: 1 / (visible crop side); rotation keeps the area."""
    image = np.full((S, S, 3), 40)
    image[16:32, 16:32] = 200
    return np.sqrt(_masks(augment(_batch(image))).sum(axis=(1, 2)) / 256.0)


def measure_rotation(augment):
    """Orientation (degrees) of a horizontal bar, from the second moments of its mask."""
    image = np.full((S, S, 3), 40)
    image[21:27, 4:44] = 200
    masks = _masks(augment(_batch(image)))
    ys, xs = np.mgrid[0:S, 0:S]
    angles = []
    for mask in masks:
        x, y = xs[mask], ys[mask]
        x, y = x - x.mean(), y - y.mean()
        angles.append(np.degrees(0.5 * np.arctan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean())))
    return np.array(angles)


def measure_brightness(augment):
    return augment(_batch(np.full((S, S, 3), 128))).astype(np.float64).mean(axis=(1, 2, 3)) - 128


def measure_contrast(augment):
    image = np.full((S, S, 3), 96)
    image[S // 2 :] = 160
    return augment(_batch(image)).astype(np.float64).std(axis=(1, 2, 3)) / 32.0


def measure_saturation(augment):
    image = np.empty((S, S, 3))
    image[...] = [140, 110, 110]
    out = augment(_batch(image)).astype(np.float64).mean(axis=(1, 2))
    return (out[:, 0] - out[:, 1]) / 30.0


# (measure, expected low, expected high) with the ranges the Keras layers were configured with.
MEASURES = {
    "zoom": (measure_zoom, 1.0, 1.25),  # RandomZoom(-0.2, 0): crop side 0.8..1.0
    "rotation": (measure_rotation, -10.8, 10.8),  # RandomRotation(0.03) of a full turn
    "brightness": (measure_brightness, -51.0, 51.0),  # 0.2 of the 0..255 range
    "contrast": (measure_contrast, 0.8, 1.2),
    "saturation": (measure_saturation, 0.3 / 0.7, 0.7 / 0.3),
}


def test_flip_rate_is_one_half_as_before():
    ours, before = measure_flip(_ours).mean(), measure_flip(_keras).mean()
    # Binomial standard deviation at N=400: 0.025; 4 of them.
    assert abs(ours - 0.5) < 0.1 and abs(before - 0.5) < 0.1, (ours, before)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_range_of_each_change_matches_the_keras_layers(name):
    measure, low, high = MEASURES[name]
    ours, before = measure(_ours), measure(_keras)
    span = high - low
    if name == "contrast":
        # Measured: Keras 3.15's RandomColorJitter(contrast_factor=0.2) only ever raised contrast (x0.99..1.20
        # here), not the +-20% it was configured with; ours does the configured +-20%, so the upper end agrees.
        assert abs(np.percentile(ours, 99) - np.percentile(before, 99)) < 0.05
        before = ours
    for values, who in ((ours, "ours"), (before, "keras layers")):
        lo, hi = np.percentile(values, [1, 99])
        # Within the configured range (a small allowance for pixel rounding and bilinear edges) ...
        assert low - 0.06 * span <= lo and hi <= high + 0.06 * span, (who, lo, hi)
        # ... and filling it: uniform draws reach near both ends.
        assert lo < low + 0.15 * span and hi > high - 0.15 * span, (who, lo, hi)
    # The same spread as Keras' layers: standard deviations within 15%.
    assert abs(np.std(ours) - np.std(before)) < 0.15 * np.std(before), (np.std(ours), np.std(before))


def test_xla_version_resamples_like_the_op_and_compiles():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    pixels = tf.constant(rng.integers(0, 256, (8, 24, 24, 3)).astype(np.float32))
    transforms = geometry_transforms(sample_augmentation(8, tf.constant([3, 4], tf.int64)), 24, 24)
    reference = resample_with_op(pixels, transforms).numpy()
    compiled = tf.function(resample_with_gathers, jit_compile=True)(pixels, transforms).numpy()
    np.testing.assert_allclose(compiled, reference, atol=0.02)


def test_same_seed_same_change_and_strength_scales():
    import tensorflow as tf

    image = np.random.default_rng(1).integers(0, 256, (16, S, S, 3)).astype(np.uint8)
    np.testing.assert_array_equal(_ours(image, 5), _ours(image, 5))
    assert np.mean(_ours(image, 5) != _ours(image, 6)) > 0.5
    half = AugmentationRanges.for_strength(0.5)
    params = sample_augmentation(2000, tf.constant([1, 2], tf.int64), half)
    assert np.degrees(np.abs(params["angle"].numpy()).max()) == pytest.approx(5.4, abs=0.1)
    assert params["zoom"].numpy().min() == pytest.approx(0.9, abs=0.01)


def test_augmentation_runs_in_the_training_step_only_and_never_in_the_saved_model(tmp_path):
    import keras

    import carclf_flavor
    from carclf_flavor.resnet import build_resnet

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    y = keras.utils.to_categorical(np.arange(16) % 4, 4)

    def trained(augment, seed=0):
        keras.utils.set_random_seed(0)
        model = build_resnet(depth=18, num_classes=4, image_size=32, width=0.125)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
        if augment:
            augment_in_train_step(model, seed=seed)
            augment_in_train_step(model, seed=seed)  # a second phase re-wraps, never stacks
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        return model

    plain, augmented, again = trained(False), trained(True), trained(True)
    other_seed = trained(True, seed=1)
    weights = lambda m: np.concatenate([w.ravel() for w in m.get_weights()])  # noqa: E731
    # The step saw other images than the plain one, the same ones for the same seed, others for another seed.
    assert not np.allclose(weights(plain), weights(augmented))
    np.testing.assert_array_equal(weights(augmented), weights(again))
    assert not np.allclose(weights(augmented), weights(other_seed))
    # Inference is not augmented: predict is deterministic, and the saved model has no augmentation in it.
    np.testing.assert_array_equal(augmented.predict(x, verbose=0), augmented.predict(x, verbose=0))
    carclf_flavor.save_model(augmented, tmp_path / "model", ["a", "b", "c", "d"])
    loaded = carclf_flavor.load_model(str(tmp_path / "model"))
    saved_files = " ".join(p.read_text(errors="ignore") for p in (tmp_path / "model").rglob("*.json"))
    assert "augment" not in saved_files.lower() and "random" not in saved_files.lower()
    assert not any("augment" in layer.name or "random" in type(layer).__name__.lower() for layer in loaded.model.layers)
