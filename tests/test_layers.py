"""The Scale and CaffePreprocess layers: arithmetic, gradients, serialisation, mixed precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from carclf_flavor.layers import CaffePreprocess, Scale


@pytest.fixture
def restore_policy():
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


def _random_scale(layer, rng):
    layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape).astype("float32"))
    layer.beta.assign(rng.normal(0.0, 1.0, layer.beta.shape).astype("float32"))


def test_scale_starts_as_identity_and_computes_gamma_x_plus_beta_per_channel():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 4, 3)).astype("float32")
    layer = Scale()
    np.testing.assert_allclose(layer(x), x)  # gamma=1, beta=0 at init
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]
    _random_scale(layer, rng)
    gamma, beta = (np.asarray(v) for v in (layer.gamma, layer.beta))
    np.testing.assert_allclose(layer(x), x * gamma + beta, rtol=1e-6)


def test_scale_on_a_non_last_axis_broadcasts_over_that_axis():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 5)).astype("float32")
    layer = Scale(axis=1)
    layer.build(x.shape)
    assert layer.gamma.shape == (3,)
    _random_scale(layer, rng)
    gamma, beta = (np.asarray(v).reshape(1, 3, 1, 1) for v in (layer.gamma, layer.beta))
    np.testing.assert_allclose(layer(x), x * gamma + beta, rtol=1e-6)


def test_scale_gradients_reach_gamma_and_beta():
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(3, 4, 4, 6)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(3, 4, 4, 6)).astype("float32"))
    layer = Scale()
    layer.build(x.shape)
    _random_scale(layer, rng)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) * upstream)
    d_gamma, d_beta, d_x = tape.gradient(loss, [layer.gamma.value, layer.beta.value, x])
    # d/dgamma sum(up * (g x + b)) = sum over batch and space of up * x; d/dbeta = sum of up; d/dx = up * g.
    np.testing.assert_allclose(d_gamma, np.sum(upstream * x, axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(d_beta, np.sum(upstream, axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(d_x, upstream * np.asarray(layer.gamma), rtol=1e-5)


def test_scale_trains_inside_a_model():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype("float32")
    target = x * np.array([2.0, -1.0, 0.5, 3.0], "float32") + np.array([1.0, 0.0, -2.0, 0.5], "float32")
    model = keras.Sequential([keras.Input((4,)), Scale(name="scale")])
    model.compile(keras.optimizers.Adam(0.1), "mse")
    first = model.evaluate(x, target, verbose=0)
    model.fit(x, target, epochs=60, batch_size=64, verbose=0)
    assert model.evaluate(x, target, verbose=0) < first / 100
    np.testing.assert_allclose(model.get_layer("scale").gamma, [2.0, -1.0, 0.5, 3.0], atol=0.1)


def test_scale_config_round_trip_keeps_every_argument():
    layer = Scale(
        axis=1,
        gamma_initializer=keras.initializers.Constant(2.0),
        beta_initializer="ones",
        gamma_regularizer=keras.regularizers.L2(0.01),
        name="s",
        dtype="mixed_bfloat16",
    )
    config = layer.get_config()
    clone = Scale.from_config(config)
    assert clone.get_config() == config
    assert clone.axis == 1 and clone.name == "s"
    assert isinstance(clone.gamma_regularizer, keras.regularizers.L2)
    clone.build((None, 3, 2))
    np.testing.assert_allclose(clone.gamma, [2.0, 2.0, 2.0])
    np.testing.assert_allclose(clone.beta, [1.0, 1.0, 1.0])
    # Registered: the generic Keras deserialiser finds it by its registered name, no custom_objects.
    assert keras.saving.get_registered_name(Scale) == "carclf>Scale"
    revived = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(revived, Scale) and revived.get_config() == config


def test_model_with_scale_saves_and_loads_with_safe_mode(tmp_path):
    rng = np.random.default_rng(4)
    inputs = keras.Input((4, 4, 3), dtype="uint8")
    x = CaffePreprocess()(inputs)
    x = keras.layers.Conv2D(5, 3, padding="same")(x)
    x = Scale(name="scale")(x)
    model = keras.Model(inputs, x)
    _random_scale(model.get_layer("scale"), rng)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-6)
    assert isinstance(loaded.get_layer("scale"), Scale)


def test_scale_under_mixed_precision_keeps_float32_variables_and_computes_in_bfloat16(restore_policy):
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = Scale()
    out = layer(np.ones((2, 3), "float32"))
    assert layer.gamma.dtype == "float32" and layer.beta.dtype == "float32"
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(layer(np.full((2, 3), 2.0, "float32")), tf.float32))
    grads = tape.gradient(loss, [layer.gamma.value, layer.beta.value])
    assert all(g is not None and g.dtype == tf.float32 for g in grads)
    np.testing.assert_allclose(grads[0], [4.0, 4.0, 4.0])


def test_caffe_preprocess_matches_keras_applications_resnet_preprocessing():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    ours = CaffePreprocess()(images)
    reference = keras.applications.resnet.preprocess_input(images.astype("float32"))
    assert keras.backend.standardize_dtype(ours.dtype) == "float32"
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    bf16 = CaffePreprocess(dtype="bfloat16")(images)
    assert keras.backend.standardize_dtype(bf16.dtype) == "bfloat16"
    np.testing.assert_allclose(np.asarray(tf.cast(bf16, tf.float32)), reference, atol=0.6)  # bf16 rounding


def test_caffe_preprocess_without_the_flip_keeps_rgb_order_and_old_configs_still_flip():
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    bgr = keras.applications.resnet.preprocess_input(images.astype("float32"))
    rgb = CaffePreprocess(mean=CaffePreprocess().mean[::-1], flip_channels=False)(images)
    np.testing.assert_allclose(rgb, bgr[..., ::-1], atol=1e-4)
    # A layer saved before the option existed has no flip_channels in its config: it flips, as it did.
    legacy = {k: v for k, v in CaffePreprocess(name="old").get_config().items() if k != "flip_channels"}
    np.testing.assert_allclose(CaffePreprocess.from_config(legacy)(images), bgr, atol=1e-4)


def test_caffe_preprocess_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="RGB"):
        CaffePreprocess()(np.zeros((1, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match="3 values"):
        CaffePreprocess(mean=(1.0, 2.0))
