"""The network, optimizer and loss as `train` sets them up (the single-process loop and the multi-worker loop)."""

from __future__ import annotations

from carclf.training.validation import weights_argument


def build_model(config, num_classes: int, image_size: int):
    """The network exactly as ``train`` builds it (same seed -> same initial weights)."""
    import keras

    from carclf_flavor.pretrained import create_resnet

    keras.utils.set_random_seed(int(config.seed))
    return create_resnet(
        depth=config.depth,
        num_classes=num_classes,
        image_size=image_size,
        weights=weights_argument(config.weights),
        dropout=config.dropout,
        width=config.width,
    )


def batchnorm_momentum(config, steps_per_epoch: int) -> float:
    """BN moving-average momentum: ``bn_momentum``, or (0 = auto) a window of about one epoch's steps,
    between 0.9 and Keras' 0.99. With 0.99 and a small set (a few steps per epoch) the moving statistics
    lag far behind the weights and validation/test accuracy collapse although training accuracy is high."""
    if config.bn_momentum > 0:
        return float(config.bn_momentum)
    return float(min(0.99, max(0.9, 1.0 - 1.0 / max(1, steps_per_epoch))))


def set_batchnorm_momentum(model, momentum: float) -> None:
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def make_optimizer(config, learning_rate: float):
    import keras

    kwargs = {"weight_decay": config.weight_decay} if config.weight_decay > 0 else {}
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=config.momentum, nesterov=True, **kwargs)
    return keras.optimizers.Adam(learning_rate, **kwargs)


def compile_for_phase(model, config, phase: str, learning_rate: float) -> None:
    """Freeze or unfreeze the backbone for ``phase`` ("head" / "full") and compile with a fresh optimizer."""
    import keras

    from carclf_flavor.resnet import backbone_trainable

    backbone_trainable(model, phase == "full")
    model.compile(
        optimizer=make_optimizer(config, learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"),
        ],
    )
    model.optimizer.build(model.trainable_variables)


def one_hot_labels(num_classes: int):
    """A tf.data map function: (images, int labels) -> (images, one-hot float labels)."""
    import tensorflow as tf

    def convert(images, labels):
        return images, tf.one_hot(labels, num_classes, dtype=tf.float32)

    return convert
