"""Shared pieces of the network tests: varied uint8 images, realistic random BN statistics, legacy .h5 writing."""

from __future__ import annotations

import numpy as np


def varied_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB images with different structure (smooth colour fields, stripes, rectangles, gradients, noise),
    so a random network gives them different features and different top-1 classes."""
    import cv2

    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), np.uint8)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        kind = i % 4
        if kind == 0:  # smooth random colour field
            coarse = rng.uniform(0, 255, (int(rng.integers(2, 8)),) * 2 + (3,)).astype(np.float32)
            image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        elif kind == 1:  # stripes at a random angle and frequency, random colours
            angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 12)
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)))
            c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            image = wave[..., None] * c0 + (1 - wave[..., None]) * c1
        elif kind == 2:  # rectangles on a background
            image = np.tile(rng.uniform(0, 255, 3), (size, size, 1))
            for _ in range(int(rng.integers(1, 6))):
                x0, y0 = rng.integers(0, size - 4, 2)
                w, h = rng.integers(4, size // 2 + 4, 2)
                image[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
        else:  # linear gradient
            c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            t = x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)
            t = (t - t.min()) / max(1e-6, t.max() - t.min())
            image = t[..., None] * c0 + (1 - t[..., None]) * c1
        image = image + rng.normal(0, rng.uniform(0, 25), image.shape)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return images


def randomize_batchnorm_and_biases(
    model, calibration_inputs, seed: int = 0, conv_bias_std: float = 0.1, residual_gamma=(0.1, 0.3)
):
    """Non-trivial weights everywhere fusion or import could go wrong, with activations kept O(1).

    Random gamma/beta (in BN or in Scale), random conv biases (keras.applications' convs carry them), then the
    moving statistics are set to the real batch statistics of ``calibration_inputs`` (momentum 0, one training
    pass) and perturbed, so the inference-mode network is well scaled but its BN is far from identity.
    """
    import keras

    from carclf_flavor.layers import Scale

    rng = np.random.default_rng(seed)
    last_units = {f"{name}_{unit}" for name in _block_names(model) for unit in ("2", "3")}
    last_units = {u for u in last_units if not u.endswith("_2") or f"{u[:-2]}_3" not in last_units}

    def gamma_for(layer_name, shape):
        # Trained ResNets keep the last BN of each residual branch small (the shortcut carries the signal);
        # with all gammas ~1 a random deep ResNet is chaotic and amplifies ANY rounding ~3x per stage.
        low, high = residual_gamma if layer_name.rsplit("_", 1)[0] in last_units else (0.6, 1.4)
        return rng.uniform(low, high, shape).astype("float32")

    batchnorms = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            batchnorms.append(layer)
            if layer.scale:
                layer.gamma.assign(gamma_for(layer.name, layer.gamma.shape))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.2, layer.beta.shape).astype("float32"))
        elif isinstance(layer, Scale):
            layer.gamma.assign(gamma_for(layer.name, layer.gamma.shape))
            layer.beta.assign(rng.normal(0.0, 0.2, layer.beta.shape).astype("float32"))
        elif isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            layer.bias.assign(rng.normal(0.0, conv_bias_std, layer.bias.shape).astype("float32"))
    momenta = [layer.momentum for layer in batchnorms]
    for layer in batchnorms:
        layer.momentum = 0.0
    model(calibration_inputs, training=True)
    for layer, momentum in zip(batchnorms, momenta):
        layer.momentum = momentum
        mean, variance = (np.asarray(v) for v in (layer.moving_mean, layer.moving_variance))
        std = np.sqrt(variance + 1e-3)
        layer.moving_mean.assign((mean + rng.normal(0, 0.1, mean.shape) * std).astype("float32"))
        layer.moving_variance.assign((variance * rng.uniform(0.7, 1.4, variance.shape)).astype("float32"))


def _block_names(model):
    import re

    return {m.group(1) for layer in model.layers for m in [re.match(r"^(conv[2-5]_block\d+)_", layer.name)] if m}


def write_legacy_h5(path, model, rename=None):
    """Write ``model``'s weights as Keras 2 ``save_weights`` did (the layout of keras.applications'
    resnet50_weights_tf_dim_ordering_tf_kernels[_notop].h5): root attrs layer_names/backend/keras_version,
    one group per layer with a weight_names attr and datasets named '<layer>/<weight>:0'."""
    import h5py

    rename = rename or (lambda name: name)
    with h5py.File(path, "w") as handle:
        handle.attrs["backend"] = b"tensorflow"
        handle.attrs["keras_version"] = b"2.2.4"
        names = [rename(layer.name) for layer in model.layers]
        handle.attrs["layer_names"] = [n.encode() for n in names]
        for layer, name in zip(model.layers, names):
            group = handle.create_group(name)
            weight_names = [f"{name}/{v.name}:0" for v in layer.weights]
            group.attrs["weight_names"] = [n.encode() for n in weight_names]
            for weight_name, variable in zip(weight_names, layer.weights):
                group.create_dataset(weight_name, data=np.asarray(variable))
