"""The project's Keras layers: the trainable per-channel ``Scale`` and the in-model ``CaffePreprocess``.

Both are registered with ``keras.saving.register_keras_serializable(package="carclf")``: importing this
module is all a loader needs for ``keras.saving.load_model(path, safe_mode=True)`` to rebuild a saved
carclf network without ``custom_objects``, pickle or Lambda bytecode.

Only Keras (and numpy) are imported: this module ships inside every saved model.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

# keras.applications ResNet "caffe" preprocessing: BGR channel means of the ImageNet training set.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="carclf")
class Scale(keras.layers.Layer):
    """``gamma * x + beta`` with one trainable gamma and beta per channel on ``axis``.

    The Caffe ResNets put this after every BatchNormalization that carries only the moving
    mean/variance (``center=False, scale=False``). Variables follow the layer's dtype policy
    (float32 under ``mixed_bfloat16``); the arithmetic runs in the compute dtype.
    """

    def __init__(
        self,
        axis: int = -1,
        gamma_initializer="ones",
        beta_initializer="zeros",
        gamma_regularizer=None,
        beta_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(axis, int):
            raise TypeError(f"Scale axis must be an int, got {axis!r}")
        self.axis = axis
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.supports_masking = True

    def _normalized_axis(self, rank: int) -> int:
        axis = self.axis + rank if self.axis < 0 else self.axis
        if not 0 <= axis < rank:
            raise ValueError(f"Scale axis={self.axis} is out of range for inputs of rank {rank}")
        return axis

    def build(self, input_shape):
        rank = len(input_shape)
        axis = self._normalized_axis(rank)
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(f"Scale needs a known size on axis {self.axis}, got input shape {tuple(input_shape)}")
        self.gamma = self.add_weight(
            name="gamma",
            shape=(channels,),
            initializer=self.gamma_initializer,
            regularizer=self.gamma_regularizer,
            trainable=True,
        )
        self.beta = self.add_weight(
            name="beta",
            shape=(channels,),
            initializer=self.beta_initializer,
            regularizer=self.beta_regularizer,
            trainable=True,
        )
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={axis: channels})
        # Channels-last needs no reshape: gamma/beta broadcast against the last axis as they are.
        self._broadcast_shape = None if axis == rank - 1 else tuple(channels if i == axis else 1 for i in range(rank))

    def call(self, inputs):
        # Explicit casts: float32 variables meet bfloat16/float16 activations under mixed precision.
        gamma = ops.cast(self.gamma, inputs.dtype)
        beta = ops.cast(self.beta, inputs.dtype)
        if self._broadcast_shape is not None:
            gamma = ops.reshape(gamma, self._broadcast_shape)
            beta = ops.reshape(beta, self._broadcast_shape)
        return inputs * gamma + beta

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            axis=self.axis,
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
            beta_initializer=keras.initializers.serialize(self.beta_initializer),
            gamma_regularizer=keras.regularizers.serialize(self.gamma_regularizer),
            beta_regularizer=keras.regularizers.serialize(self.beta_regularizer),
        )
        return config


@keras.saving.register_keras_serializable(package="carclf")
class CaffePreprocess(keras.layers.Layer):
    """uint8 RGB images -> float BGR with the channel means subtracted ("caffe" mode of keras.applications).

    This keeps the dataset and the serving input uint8: only the current batch becomes float, inside the
    model. The arithmetic runs in float32 (exact for 0..255 inputs) and the result is cast ONCE to the
    layer's compute dtype, so a bfloat16 network gets bfloat16 activations from its first convolution on.

    ``flip_channels=False`` (inference networks, see ``resnet.fuse_for_inference``): the channels stay in
    RGB order and ``mean`` is given in that order; the flip lives in the stem kernel instead, because
    OpenVINO runs a channel flip as a reference (unvectorised) ReverseSequence, 6% of the int8 network.
    """

    def __init__(self, mean: Sequence[float] = CAFFE_BGR_MEAN, flip_channels: bool = True, **kwargs):
        super().__init__(**kwargs)
        mean = tuple(float(m) for m in mean)
        if len(mean) != 3:
            raise ValueError(f"CaffePreprocess mean must have 3 values (one per channel, B, G, R), got {mean!r}")
        self.mean = mean
        self.flip_channels = bool(flip_channels)
        # No input autocast: a float input must not be rounded to bfloat16 before the float32 arithmetic.
        self.autocast = False

    def build(self, input_shape):
        if input_shape[-1] != 3:
            raise ValueError(f"CaffePreprocess expects RGB images (..., 3), got input shape {tuple(input_shape)}")
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: 3})

    def call(self, inputs):
        pixels = ops.cast(inputs, "float32")
        if self.flip_channels:
            pixels = ops.flip(pixels, axis=-1)
        centered = pixels - ops.convert_to_tensor(self.mean, dtype="float32")
        return ops.cast(centered, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(mean=list(self.mean), flip_channels=self.flip_channels)
        return config
