"""Keras 3 ResNet-18/34/50/101/152 in the Caffe style of the article: the architecture and inference fusion.

Architecture (``build_resnet``)
    uint8 RGB ``(S, S, 3)`` input -> ``CaffePreprocess`` (cast, RGB->BGR, mean subtraction INSIDE the model,
    so datasets and requests stay uint8) -> 7x7/2 stem -> 3x3/2 max-pool -> four stages of ``conv_block`` /
    ``identity_block`` -> global average pooling -> dropout -> softmax head (float32 even under mixed precision).
    Every convolution is followed by ``BatchNormalization(center=False, scale=False)`` (moving statistics
    only) and a trainable ``Scale`` (gamma, beta). Bottleneck blocks (50/101/152) put the stride on the first
    1x1 convolution like Caffe and keras.applications ResNet v1; basic blocks (18/34) on the first 3x3.
    Layer names follow keras.applications (``conv{stage}_block{i}_{unit}_conv`` / ``_bn``; ``_scale`` holds
    what keras.applications keeps as BN gamma/beta), so weights map by name.

Convolutions carry NO bias. A bias in front of BatchNormalization is redundant: in training the batch mean
cancels it, in inference it only shifts the moving mean. So the Caffe original has none, training saves one
broadcast add per convolution, and on import a keras.applications bias ``b`` is folded exactly into the
moving mean (``mean - b``). The parameter count is keras.applications' minus those biases.

``build_resnet`` only builds (random initialisation). Pretrained weights are the next layer up, in
``carclf_flavor.pretrained``: ``create_resnet(..., weights=...)`` builds through ``build_resnet`` and then loads
them (timm's split of ``resnet.py`` from ``_builder.py`` / ``_pretrained.py``), so this module never imports it.

``fuse_for_inference(model, dtype)`` rebuilds the network with each conv -> BN -> Scale folded into one
convolution with bias (+ ReLU), in float32 or pure bfloat16. Only standard Keras layers plus
``CaffePreprocess`` remain, so the result saves and loads as ``.keras`` with ``safe_mode=True``.

Only Keras and numpy are imported: this module ships inside every saved model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import keras
import numpy as np

from carclf_flavor.layers import CaffePreprocess, Scale

BN_EPSILON = 1.001e-5  # keras.applications ResNet's value (Caffe used 1e-5)
STEM_FILTERS = 64
STAGE_FILTERS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
MIN_IMAGE_SIZE = 32  # five stride-2 steps: 32 px is the smallest input that keeps a 1x1 final map

# The one table of ResNet variants: depth -> (block kind, blocks in stages conv2..conv5).
RESNET_STAGES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
INFERENCE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ResNetArchitecture:
    """What ``describe_resnet`` reads back from a built (or fused, or reloaded) carclf ResNet."""

    depth: int
    block_kind: str
    stage_depths: tuple[int, int, int, int]
    stem_filters: int
    stage_filters: tuple[int, int, int, int]
    image_size: int
    num_classes: int
    head_name: str
    fused: bool


def _scaled(filters: int, width: float) -> int:
    return max(1, int(round(filters * width)))


def describe_depth(depth: int) -> str:
    kind, stages = RESNET_STAGES[depth]
    return f"ResNet-{depth} (stage depths {'-'.join(map(str, stages))})"


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
class _TrainableUnit:
    """conv (no bias) -> BN (moving statistics only) -> Scale [-> ReLU]: the unit every block is made of."""

    def __init__(self, dtype=None, kernel_initializer="he_normal"):
        self.dtype = dtype
        self.kernel_initializer = kernel_initializer

    def __call__(self, x, filters, kernel_size, strides, name, relu, padding="valid", dtype=None):
        dtype = dtype or self.dtype
        x = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=False,
            kernel_initializer=self.kernel_initializer,
            name=f"{name}_conv",
            dtype=dtype,
        )(x)
        x = keras.layers.BatchNormalization(
            axis=-1,
            center=False,
            scale=False,
            epsilon=BN_EPSILON,
            name=f"{name}_bn",
            dtype=dtype,
        )(x)
        x = Scale(axis=-1, name=f"{name}_scale", dtype=dtype)(x)
        if relu:
            x = keras.layers.Activation("relu", name=f"{name}_relu", dtype=dtype)(x)
        return x


class _FusedUnit:
    """One Conv2D with bias (and ReLU) standing for conv -> BN -> Scale [-> ReLU], weights folded beforehand."""

    def __init__(self, folded: dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]], dtype: str):
        self.folded = folded
        self.dtype = dtype
        self.pending: list[tuple[keras.layers.Layer, np.ndarray, np.ndarray]] = []

    def __call__(self, x, filters, kernel_size, strides, name, relu, padding="valid", dtype=None):
        if name not in self.folded:
            raise ValueError(f"cannot fuse: the model has no layer '{name}_conv'")
        kernel, bias, source_strides = self.folded[name]
        expected = (kernel_size, kernel_size, kernel.shape[2], filters)
        if kernel.shape != expected or tuple(source_strides) != (strides, strides):
            raise ValueError(
                f"cannot fuse layer '{name}_conv': kernel {kernel.shape} strides {tuple(source_strides)} "
                f"where the architecture needs {expected} strides {(strides, strides)}"
            )
        layer = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=True,
            activation="relu" if relu else None,
            name=f"{name}_conv",
            dtype=dtype or self.dtype,
        )
        y = layer(x)
        self.pending.append((layer, kernel, bias))
        return y


def _merge(shortcut, residual, prefix, conv_unit):
    x = keras.layers.Add(name=f"{prefix}_add", dtype=conv_unit.dtype)([shortcut, residual])
    return keras.layers.Activation("relu", name=f"{prefix}_out", dtype=conv_unit.dtype)(x)


def identity_block(x, kernel_size, filters, stage, block, conv_unit):
    """Residual block whose shortcut is the input itself (same shape in and out).

    ``filters``: (f1, f2, f3) = bottleneck 1x1 -> kxk -> 1x1; (f1, f2) = basic kxk -> kxk.
    """
    prefix = f"conv{stage}_block{block}"
    if len(filters) == 3:
        f1, f2, f3 = filters
        y = conv_unit(x, f1, 1, 1, f"{prefix}_1", relu=True)
        y = conv_unit(y, f2, kernel_size, 1, f"{prefix}_2", relu=True, padding="same")
        y = conv_unit(y, f3, 1, 1, f"{prefix}_3", relu=False)
    else:
        f1, f2 = filters
        y = conv_unit(x, f1, kernel_size, 1, f"{prefix}_1", relu=True, padding="same")
        y = conv_unit(y, f2, kernel_size, 1, f"{prefix}_2", relu=False, padding="same")
    return _merge(x, y, prefix, conv_unit)


def conv_block(x, kernel_size, filters, stage, block, conv_unit, strides=2):
    """Residual block with a projection shortcut (1x1 conv -> BN -> Scale, unit ``_0``) that changes shape."""
    prefix = f"conv{stage}_block{block}"
    shortcut = conv_unit(x, filters[-1], 1, strides, f"{prefix}_0", relu=False)
    if len(filters) == 3:
        f1, f2, f3 = filters
        # Caffe / keras.applications v1: the stride sits on the first 1x1 convolution.
        y = conv_unit(x, f1, 1, strides, f"{prefix}_1", relu=True)
        y = conv_unit(y, f2, kernel_size, 1, f"{prefix}_2", relu=True, padding="same")
        y = conv_unit(y, f3, 1, 1, f"{prefix}_3", relu=False)
    else:
        f1, f2 = filters
        y = conv_unit(x, f1, kernel_size, strides, f"{prefix}_1", relu=True, padding="same")
        y = conv_unit(y, f2, kernel_size, 1, f"{prefix}_2", relu=False, padding="same")
    return _merge(shortcut, y, prefix, conv_unit)


def _resnet_body(x, block_kind, stage_depths, stem_filters, stage_filters, conv_unit, stem_dtype=None):
    dtype = conv_unit.dtype
    stem_dtype = stem_dtype or dtype
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad", dtype=stem_dtype)(x)
    x = conv_unit(x, stem_filters, 7, 2, "conv1", relu=True, dtype=stem_dtype)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad", dtype=dtype)(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool", dtype=dtype)(x)
    channels = stem_filters
    for index, (blocks, f) in enumerate(zip(stage_depths, stage_filters)):
        stage = index + 2
        filters = (f, f, BOTTLENECK_EXPANSION * f) if block_kind == "bottleneck" else (f, f)
        strides = 1 if stage == 2 else 2
        if strides != 1 or channels != filters[-1]:
            x = conv_block(x, 3, filters, stage, 1, conv_unit, strides=strides)
        else:  # ResNet-18/34 stage conv2: 64 -> 64 at stride 1 needs no projection
            x = identity_block(x, 3, filters, stage, 1, conv_unit)
        for block in range(2, blocks + 1):
            x = identity_block(x, 3, filters, stage, block, conv_unit)
        channels = filters[-1]
    return x


def _head(x, num_classes, dropout, head_name, dtype, activation="softmax"):
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool", dtype=dtype)(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout", dtype=dtype)(x)
    # float32 head: logits and softmax stay exact under mixed precision (Keras' own recommendation).
    return keras.layers.Dense(num_classes, activation=activation, name=head_name, dtype="float32")(x)


# --------------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------------
def check_resnet_arguments(depth, num_classes, image_size, dropout=0.0, width=1.0) -> None:
    """The architecture arguments of ``build_resnet`` checked; a one-line ``ValueError`` names the bad one."""
    if int(depth) not in RESNET_STAGES:
        raise ValueError(f"depth must be one of {sorted(RESNET_STAGES)}, got {depth}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if int(image_size) < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not float(width) > 0:
        raise ValueError(f"width must be > 0, got {width}")


def build_resnet(
    depth: int,
    num_classes: int,
    image_size: int,
    dropout: float = 0.0,
    width: float = 1.0,
    head_name: str = "car_model",
    name: str | None = None,
) -> keras.Model:
    """A Caffe-style ResNet taking uint8 ``(image_size, image_size, 3)`` RGB images, softmax over ``num_classes``.

    Randomly initialised: ``carclf_flavor.pretrained.create_resnet(..., weights=...)`` adds ImageNet weights.
    ``width`` multiplies every filter count (tiny networks for tests and the sample data; pretrained weights
    need 1.0). The compute dtype follows the global Keras dtype policy (``mixed_bfloat16`` works); the head is
    always float32.
    """
    check_resnet_arguments(depth, num_classes, image_size, dropout, width)
    depth = int(depth)
    block_kind, stage_depths = RESNET_STAGES[depth]
    image_size = int(image_size)
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="image")
    x = CaffePreprocess(name="caffe_preprocess")(inputs)
    x = _resnet_body(
        x,
        block_kind,
        stage_depths,
        _scaled(STEM_FILTERS, width),
        tuple(_scaled(f, width) for f in STAGE_FILTERS),
        _TrainableUnit(),
    )
    outputs = _head(x, int(num_classes), float(dropout), head_name, dtype=None)
    return keras.Model(inputs, outputs, name=name or f"carclf_resnet{depth}")


def head_layer(model: keras.Model, head_name: str | None = None) -> keras.layers.Layer:
    if head_name is not None:
        try:
            return model.get_layer(head_name)
        except ValueError:
            raise ValueError(f"model {model.name!r} has no layer named {head_name!r}") from None
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ValueError(f"model {model.name!r} has no Dense head")
    return dense[-1]


def backbone_trainable(model: keras.Model, trainable: bool, head_name: str | None = None) -> keras.Model:
    """Freeze (``False``) or unfreeze (``True``) everything but the classification head.

    In Keras 3 a BatchNormalization with ``trainable=False`` runs in inference mode even inside
    ``fit`` (moving statistics used and not updated), so a frozen backbone is truly frozen.
    Recompile the model afterwards: ``compile`` snapshots which weights are trainable.
    """
    head = head_layer(model, head_name)
    for layer in model.layers:
        layer.trainable = True if layer is head else bool(trainable)
    return model


# --------------------------------------------------------------------------------------------------
# Reading an existing carclf ResNet back
# --------------------------------------------------------------------------------------------------
_UNIT_NAME = re.compile(r"^conv([2-5])_block(\d+)_([0-3])_conv$")


def stage_depths_of(layer_names: Iterable[str]) -> tuple[str, tuple[int, int, int, int]]:
    """(block kind, blocks in stages conv2..conv5) read from unit names ``conv{stage}_block{i}_{unit}_conv``.

    Used on a model's layers and on a weights file's layers (``carclf_flavor.pretrained``): one parser.
    """
    blocks = {stage: 0 for stage in range(2, 6)}
    bottleneck = False
    for layer_name in layer_names:
        match = _UNIT_NAME.match(layer_name)
        if match:
            stage, block, unit = (int(g) for g in match.groups())
            blocks[stage] = max(blocks[stage], block)
            bottleneck = bottleneck or unit == 3
    return ("bottleneck" if bottleneck else "basic"), tuple(blocks[stage] for stage in range(2, 6))


def describe_resnet(model: keras.Model) -> ResNetArchitecture:
    """Depth, filters, input size and head of a carclf ResNet (trainable or fused), from its layer names."""
    names = {layer.name: layer for layer in model.layers}
    if "conv1_conv" not in names or not any(isinstance(layer, CaffePreprocess) for layer in model.layers):
        raise ValueError(f"model {model.name!r} is not a carclf ResNet (no conv1_conv / CaffePreprocess layer)")
    block_kind, stage_depths = stage_depths_of(names)
    matching = [d for d, spec in RESNET_STAGES.items() if spec == (block_kind, stage_depths)]
    if not matching:
        raise ValueError(
            f"model {model.name!r} has {block_kind} stages {'-'.join(map(str, stage_depths))}, "
            f"which is none of the known ResNets {sorted(RESNET_STAGES)}"
        )
    stage_filters = tuple(int(names[f"conv{stage}_block1_1_conv"].filters) for stage in range(2, 6))
    head = head_layer(model)
    input_shape = model.inputs[0].shape
    return ResNetArchitecture(
        depth=matching[0],
        block_kind=block_kind,
        stage_depths=stage_depths,
        stem_filters=int(names["conv1_conv"].filters),
        stage_filters=stage_filters,
        image_size=int(input_shape[1]),
        num_classes=int(head.units),
        head_name=head.name,
        fused=not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers),
    )


def unit_prefixes(model: keras.Model) -> list[str]:
    return [
        layer.name[: -len("_conv")]
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.name.endswith("_conv")
    ]


# --------------------------------------------------------------------------------------------------
# Inference fusion
# --------------------------------------------------------------------------------------------------
def _folded_unit(model: keras.Model, prefix: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Kernel and bias of one conv with its following BN and Scale folded in (float64 arithmetic)."""
    conv = model.get_layer(f"{prefix}_conv")
    kernel = np.asarray(keras.ops.convert_to_numpy(conv.kernel), dtype=np.float64)
    channels = kernel.shape[-1]
    bias = np.asarray(keras.ops.convert_to_numpy(conv.bias), dtype=np.float64) if conv.use_bias else np.zeros(channels)
    multiplier = np.ones(channels)
    layer_names = {layer.name for layer in model.layers}
    if f"{prefix}_bn" in layer_names:
        bn = model.get_layer(f"{prefix}_bn")
        mean = np.asarray(keras.ops.convert_to_numpy(bn.moving_mean), dtype=np.float64)
        variance = np.asarray(keras.ops.convert_to_numpy(bn.moving_variance), dtype=np.float64)
        gamma = np.asarray(keras.ops.convert_to_numpy(bn.gamma), dtype=np.float64) if bn.scale else 1.0
        beta = np.asarray(keras.ops.convert_to_numpy(bn.beta), dtype=np.float64) if bn.center else 0.0
        factor = gamma / np.sqrt(variance + bn.epsilon)
        bias = (bias - mean) * factor + beta
        multiplier = multiplier * factor
    if f"{prefix}_scale" in layer_names:
        scale = model.get_layer(f"{prefix}_scale")
        gamma = np.asarray(keras.ops.convert_to_numpy(scale.gamma), dtype=np.float64)
        beta = np.asarray(keras.ops.convert_to_numpy(scale.beta), dtype=np.float64)
        bias = bias * gamma + beta
        multiplier = multiplier * gamma
    # The per-output-channel factor scales the kernel's last axis (HWIO layout).
    return (kernel * multiplier).astype(np.float32), bias.astype(np.float32), tuple(conv.strides)


def fuse_for_inference(model: keras.Model, dtype: str = "float32") -> keras.Model:
    """A new inference model computing the same function with conv -> BN -> Scale folded into one conv.

    ``dtype="bfloat16"``: every layer after the stem computes AND stores its weights in bfloat16 (weights
    cast once here), so oneDNN runs conv + bias (+ add) + ReLU fused on bf16 activations end to end. The
    uint8 input is cast once to float32 for the normalisation and the 7x7 stem conv, whose output is cast
    once to bf16; global pooling, head and softmax stay float32. Accepts a trainable carclf ResNet or
    an already fused one (e.g. a saved float32 inference model re-fused to bfloat16 at load time).
    Dropout disappears (identity at inference). The preprocessing's RGB->BGR flip moves into the stem
    kernel (its input channels reversed), so the network takes RGB in and has no flip operation.
    """
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"dtype must be one of {INFERENCE_DTYPES}, got {dtype!r}")
    arch = describe_resnet(model)
    folded = {prefix: _folded_unit(model, prefix) for prefix in unit_prefixes(model)}
    preprocess = next(layer for layer in model.layers if isinstance(layer, CaffePreprocess))
    mean = preprocess.mean
    if preprocess.flip_channels:
        # conv(flip(x) - mean, K) == conv(x - flip(mean), K with its input channels flipped): the same
        # function without a channel flip in the graph (OpenVINO runs one unvectorised).
        kernel, bias, strides = folded["conv1"]
        folded["conv1"] = (np.ascontiguousarray(kernel[:, :, ::-1, :]), bias, strides)
        mean = tuple(reversed(mean))
    head = model.get_layer(arch.head_name)

    inputs = keras.Input(shape=(arch.image_size, arch.image_size, 3), dtype="uint8", name="image")
    # The stem (input normalisation + 7x7 conv, ~3% of ResNet-50's FLOPs) stays float32: rounding the
    # mean-subtracted pixels to bfloat16 (steps of 0.5-1 grey level) was the largest single source of
    # bf16-vs-f32 disagreement we measured. The stem's output is cast to bf16 once, by pool1_pad.
    x = CaffePreprocess(mean=mean, flip_channels=False, name="caffe_preprocess", dtype="float32")(inputs)
    unit = _FusedUnit(folded, dtype)
    x = _resnet_body(
        x, arch.block_kind, arch.stage_depths, arch.stem_filters, arch.stage_filters, unit, stem_dtype="float32"
    )
    unused = set(folded) - {layer.name[: -len("_conv")] for layer, _, _ in unit.pending}
    if unused:
        raise ValueError(
            f"cannot fuse: layers {sorted(f'{p}_conv' for p in unused)} are not part of a {describe_depth(arch.depth)}"
        )
    # Pool in float32: averaging 7x7 bf16 values in bf16 would cost accuracy for no measurable speed.
    activation = keras.activations.serialize(head.activation)
    outputs = _head(x, arch.num_classes, 0.0, arch.head_name, dtype="float32", activation=activation)
    base_name = re.sub(r"_fused$", "", model.name)
    fused = keras.Model(inputs, outputs, name=f"{base_name}_fused")
    for layer, kernel, bias in unit.pending:
        layer.set_weights([kernel, bias])  # cast to the layer's variable dtype (bf16) once, here
    fused.get_layer(arch.head_name).set_weights(
        [np.asarray(keras.ops.convert_to_numpy(w), dtype=np.float32) for w in head.weights]
    )
    return fused
