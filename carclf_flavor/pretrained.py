"""ImageNet weights from keras.applications into a carclf ResNet (``carclf_flavor.resnet``), kept apart from the
architecture as timm keeps ``_pretrained.py`` / ``_builder.py`` beside ``resnet.py``.

``create_resnet(depth, num_classes, image_size, weights=None, ...)`` is the builder with weights (timm's
``build_model_with_cfg``): the architecture from ``resnet.build_resnet``, then ``load_imagenet_weights``.
``load_imagenet_weights(model, source)`` with ``source`` = ``"imagenet"`` (download through keras.applications),
a path to a keras.applications weights file (legacy ``resnet50_weights_tf_dim_ordering_tf_kernels[_notop].h5``
layout, Keras 3 ``.weights.h5``, or a ``.keras`` model) or an in-memory keras.applications ResNet. Layer names are
mapped to keras.applications naming (the Caffe-converted file's ``res2a_branch2a`` included); each conv bias is
folded into the following BN's moving mean (our convolutions have none: see ``carclf_flavor.resnet``). Any
mismatch raises ``WeightsError`` naming the layer; nothing is loaded partially.

Only Keras, numpy and h5py are imported: this module ships inside every saved model.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile

import keras
import numpy as np

from carclf_flavor.resnet import (
    MIN_IMAGE_SIZE,
    RESNET_STAGES,
    build_resnet,
    check_resnet_arguments,
    describe_depth,
    describe_resnet,
    head_layer,
    stage_depths_of,
    unit_prefixes,
)

_logger = logging.getLogger(__name__)

# keras.applications ships ImageNet weights for these depths only.
KERAS_APPLICATIONS = {50: "ResNet50", 101: "ResNet101", 152: "ResNet152"}
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
IMAGENET_HEAD = "predictions"


class WeightsError(ValueError):
    """Pretrained weights that cannot be used: unreadable, wrong depth or width, missing layers, wrong shapes."""


def weight_file_name(depth: int, include_top: bool) -> str:
    """The file keras.applications downloads (and caches in ~/.keras/models) for ``depth``."""
    return f"resnet{depth}_weights_tf_dim_ordering_tf_kernels{'' if include_top else '_notop'}.h5"


def check_weights_compatible(depth: int, width: float):
    if depth not in KERAS_APPLICATIONS:
        raise WeightsError(
            f"pretrained weights exist only for depths {sorted(KERAS_APPLICATIONS)} (keras.applications), "
            f"not {depth}: use weights=None"
        )
    if width != 1.0:
        raise WeightsError(f"pretrained weights need width=1.0, got width={width}")


# The original Caffe-converted ResNet-50 file (fchollet/deep-learning-models) names layers
# res2a_branch2a / bn2a_branch2a / fc1000; ResNet-101/152 Caffe names count blocks b1, b2, ...
_CAFFE_NAME = re.compile(r"^(res|bn)([2-5])([a-z])(\d*)_branch(1|2a|2b|2c)$")
_CAFFE_UNITS = {"1": "0", "2a": "1", "2b": "2", "2c": "3"}
_WEIGHT_KEYS = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")


def _canonical_layer_name(name: str) -> str:
    special = {"conv1": "conv1_conv", "bn_conv1": "conv1_bn", "fc1000": IMAGENET_HEAD}
    if name in special:
        return special[name]
    match = _CAFFE_NAME.match(name)
    if not match:
        return name
    kind, stage, letter, number, branch = match.groups()
    block = int(number) + 1 if number else ord(letter) - ord("a") + 1
    return f"conv{stage}_block{block}_{_CAFFE_UNITS[branch]}_{'conv' if kind == 'res' else 'bn'}"


def _weights_of_keras_model(model: keras.Model) -> dict[str, dict[str, np.ndarray]]:
    weights = {}
    for layer in model.layers:
        if layer.weights:
            weights[_canonical_layer_name(layer.name)] = {
                variable.name.split("/")[-1].split(":")[0]: np.asarray(keras.ops.convert_to_numpy(variable))
                for variable in layer.weights
            }
    return weights


def _keras_application(depth: int, include_top: bool, weights, classes: int = 1000) -> keras.Model:
    builder = getattr(keras.applications, KERAS_APPLICATIONS[depth])
    input_shape = None if (include_top and weights == "imagenet") else (MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3)
    return builder(weights=weights, include_top=include_top, input_shape=input_shape, classes=classes)


def _read_attribute_list(group, name: str) -> list[str]:
    """An HDF5 string-list attribute as Keras 2 writes it (split into name0, name1, ... when large)."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _read_legacy_h5(handle, path: str) -> dict[str, dict[str, np.ndarray]]:
    root = handle["model_weights"] if "model_weights" in handle else handle
    weights = {}
    for layer_name in _read_attribute_list(root, "layer_names"):
        if layer_name not in root:
            raise WeightsError(f"{path}: layer {layer_name!r} is listed but has no group in the file")
        group = root[layer_name]
        arrays = {}
        for weight_name in _read_attribute_list(group, "weight_names"):
            key = weight_name.split("/")[-1].split(":")[0]
            if key not in _WEIGHT_KEYS:
                raise WeightsError(f"{path}: layer {layer_name!r} has an unknown weight {weight_name!r}")
            arrays[key] = np.asarray(group[weight_name], dtype=np.float32)
        if arrays:
            weights[_canonical_layer_name(layer_name)] = arrays
    return weights


_KERAS3_CONV_COUNTS = {
    1 + sum(stages) * 3 + 4: depth for depth, (kind, stages) in RESNET_STAGES.items() if depth in KERAS_APPLICATIONS
}


def _read_keras3_weights(handle, path: str) -> dict[str, dict[str, np.ndarray]]:
    """Keras 3 ``.weights.h5``: groups are named by class (conv2d_17), so let Keras itself read the file
    into the keras.applications model of the depth the file's convolution count gives."""
    layer_groups = list(handle["layers"].keys())
    convs = sum(1 for g in layer_groups if re.fullmatch(r"conv2d(_\d+)?", g))
    dense = [g for g in layer_groups if re.fullmatch(r"dense(_\d+)?", g)]
    if convs not in _KERAS3_CONV_COUNTS or len(dense) > 1:
        raise WeightsError(
            f"{path}: {convs} convolution and {len(dense)} dense layers; a keras.applications ResNet-50/101/152 "
            f"has {sorted(_KERAS3_CONV_COUNTS)} convolutions and 0 or 1 dense layer"
        )
    depth = _KERAS3_CONV_COUNTS[convs]
    classes = 1000
    if dense:
        kernel = handle["layers"][dense[0]]["vars"]["0"]
        classes = int(kernel.shape[-1])
    handle.close()
    reference = _keras_application(depth, include_top=bool(dense), weights=None, classes=classes)
    try:
        reference.load_weights(path)
    except Exception as error:  # Keras' own reader: report its reason with the file and the model tried
        raise WeightsError(
            f"{path}: cannot be read as keras.applications.{KERAS_APPLICATIONS[depth]}"
            f"(include_top={bool(dense)}): {error}"
        ) from error
    return _weights_of_keras_model(reference)


def read_resnet_weights(source) -> tuple[dict[str, dict[str, np.ndarray]], str]:
    """``{layer name (keras.applications naming): {kernel|bias|gamma|beta|moving_mean|moving_variance: array}}``
    from a keras.applications ResNet weights file, plus a description of the source for messages."""
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    if zipfile.is_zipfile(path):  # a whole .keras model saved from keras.applications
        try:
            reference = keras.saving.load_model(path, compile=False)
        except Exception as error:
            raise WeightsError(f"{path}: cannot load this .keras file: {error}") from error
        return _weights_of_keras_model(reference), path
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise WeightsError(f"{path}: not an HDF5 weights file ({error})") from error
    try:
        root = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" in root.attrs or "layer_names0" in root.attrs:
            return _read_legacy_h5(handle, path), path
        if "layers" in handle and "vars" in handle:
            return _read_keras3_weights(handle, path), path
        raise WeightsError(f"{path}: neither a legacy Keras .h5 (layer_names) nor a Keras 3 .weights.h5 file")
    finally:
        if handle.id.valid:
            handle.close()


def _imagenet_weights(depth: int, include_top: bool) -> tuple[dict[str, dict[str, np.ndarray]], str]:
    try:
        reference = _keras_application(depth, include_top=include_top, weights="imagenet")
    except Exception as error:
        file_name = weight_file_name(depth, include_top)
        raise WeightsError(
            f"could not get the ImageNet weights of keras.applications.{KERAS_APPLICATIONS[depth]} "
            f"({type(error).__name__}: {error}). Without internet access, download {KERAS_WEIGHTS_URL}{file_name} "
            f"elsewhere, copy it here and pass its path: weights='/path/to/{file_name}' "
            f"(or put it in ~/.keras/models/)"
        ) from error
    return _weights_of_keras_model(reference), f"keras.applications.{KERAS_APPLICATIONS[depth]} ImageNet weights"


def load_imagenet_weights(model: keras.Model, source, head_name: str | None = None) -> dict:
    """Copy keras.applications ResNet weights into a (trainable, unfused) carclf ResNet of the same depth.

    ``source``: ``"imagenet"``, a path (see module docstring) or an in-memory keras.applications ResNet. Conv kernels are copied, each conv bias is
    folded into the following BN's moving mean, BN moving mean/variance go to our BN and BN gamma/beta to
    our Scale. The 1000-class ImageNet top is copied only when the head has the same shape. Everything is
    checked before anything is assigned. Returns ``{"source", "layers", "head_carried"}``.
    """
    arch = describe_resnet(model)
    if arch.fused:
        raise ValueError("load weights into the trainable model, then fuse it (this model is already fused)")
    if arch.depth not in KERAS_APPLICATIONS:
        raise WeightsError(
            f"pretrained weights exist only for depths {sorted(KERAS_APPLICATIONS)}, not for this ResNet-{arch.depth}"
        )
    head = head_layer(model, head_name or arch.head_name)
    if isinstance(source, str) and source == "imagenet":
        weights, description = _imagenet_weights(arch.depth, include_top=arch.num_classes == 1000)
    elif isinstance(source, keras.Model):  # an in-memory keras.applications ResNet
        weights, description = _weights_of_keras_model(source), f"model {source.name!r}"
    elif isinstance(source, (str, os.PathLike)):
        weights, description = read_resnet_weights(source)
    else:
        raise WeightsError(
            f"weights must be None, 'imagenet', a file path or a keras.applications model, got {source!r}"
        )

    kind, stages = stage_depths_of(weights)  # the file's unit names, parsed as the model's own are
    if (kind, stages) != (arch.block_kind, arch.stage_depths):
        found = [d for d, spec in RESNET_STAGES.items() if spec == (kind, stages)]
        found_text = f"ResNet-{found[0]}" if found else f"an unknown {kind} network"
        raise WeightsError(
            f"{description} holds {found_text} (stage depths {'-'.join(map(str, stages))}) but the model is "
            f"{describe_depth(arch.depth)}"
        )

    assignments = []  # (layer, [arrays]) checked completely before anything is written
    used = set()

    def need(layer_name: str, key: str, shape) -> np.ndarray:
        arrays = weights.get(layer_name)
        if arrays is None:
            raise WeightsError(f"{description} has no layer {layer_name!r} (needed by {model.name})")
        if key not in arrays:
            raise WeightsError(f"{description}: layer {layer_name!r} has no {key!r} weight")
        value = arrays[key]
        if tuple(value.shape) != tuple(shape):
            raise WeightsError(
                f"{description}: layer {layer_name!r} {key} has shape {tuple(value.shape)}, "
                f"the model needs {tuple(shape)}"
            )
        used.add(layer_name)
        return value.astype(np.float32)

    for prefix in unit_prefixes(model):
        conv, bn, scale = (model.get_layer(f"{prefix}_{part}") for part in ("conv", "bn", "scale"))
        kernel = need(f"{prefix}_conv", "kernel", conv.kernel.shape)
        channels = kernel.shape[-1]
        source_conv = weights[f"{prefix}_conv"]
        bias = need(f"{prefix}_conv", "bias", (channels,)) if "bias" in source_conv else np.zeros(channels, np.float32)
        mean = need(f"{prefix}_bn", "moving_mean", (channels,))
        variance = need(f"{prefix}_bn", "moving_variance", (channels,))
        source_bn = weights[f"{prefix}_bn"]
        gamma = need(f"{prefix}_bn", "gamma", (channels,)) if "gamma" in source_bn else np.ones(channels, np.float32)
        beta = need(f"{prefix}_bn", "beta", (channels,)) if "beta" in source_bn else np.zeros(channels, np.float32)
        # BN(conv + b) with moving mean m == BN(conv) with moving mean m - b: the bias folds exactly.
        folded_mean = (mean.astype(np.float64) - bias.astype(np.float64)).astype(np.float32)
        assignments += [(conv, [kernel]), (bn, [folded_mean, variance]), (scale, [gamma, beta])]

    unexpected = sorted(set(weights) - used - {IMAGENET_HEAD})
    if unexpected:
        raise WeightsError(
            f"{description} holds layers this {describe_depth(arch.depth)} does not have: "
            f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )

    head_carried = False
    top = weights.get(IMAGENET_HEAD)
    if top is not None and "kernel" in top and "bias" in top:
        if tuple(top["kernel"].shape) == tuple(head.kernel.shape) and tuple(top["bias"].shape) == tuple(
            head.bias.shape
        ):
            assignments.append((head, [top["kernel"].astype(np.float32), top["bias"].astype(np.float32)]))
            head_carried = True
        else:
            _logger.info(
                "ImageNet top %s not carried over to head %r %s (different number of classes)",
                tuple(top["kernel"].shape),
                head.name,
                tuple(head.kernel.shape),
            )

    for layer, arrays in assignments:
        layer.set_weights(arrays)
    summary = {"source": description, "layers": len(used), "head_carried": head_carried}
    _logger.info(
        "loaded %d layers from %s into %s (head carried over: %s)", len(used), description, model.name, head_carried
    )
    return summary


def create_resnet(
    depth: int,
    num_classes: int,
    image_size: int,
    weights=None,
    dropout: float = 0.0,
    width: float = 1.0,
    head_name: str = "car_model",
    name: str | None = None,
) -> keras.Model:
    """``resnet.build_resnet(...)`` with ``weights``: None (random init), ``"imagenet"`` or a path to a
    keras.applications weights file (see ``load_imagenet_weights``).

    Every argument is checked before the network is built: an unusable weights request (a depth without
    keras.applications weights, width != 1.0) fails at once, not after building a large model.
    """
    check_resnet_arguments(depth, num_classes, image_size, dropout, width)
    if weights is not None:
        check_weights_compatible(int(depth), float(width))
    model = build_resnet(depth, num_classes, image_size, dropout=dropout, width=width, head_name=head_name, name=name)
    if weights is not None:
        load_imagenet_weights(model, weights)
    return model
