"""Grad-CAM heatmaps for carclf's Keras ResNets: which part of the network's input drove a class score.

Grad-CAM (Selvaraju et al., 2017): with ``A`` the last convolutional feature map (h, w, K) and ``y_c`` the
pre-softmax score of class ``c``, each channel gets the weight ``alpha_k = mean over positions of dy_c/dA_k``
and the heatmap is ``ReLU(sum_k alpha_k * A_k)``, scaled to [0, 1] and enlarged to the input size. The score
is the logit, not the probability: a softmax output near 1 has a vanishing gradient and would give noise.

- ``feature_map(model)``: the tensor the global average pool reads (the last convolutional feature map).
- ``GradCAM(model)``: ``gradcam(pixels, class_ids) -> (N, S, S) float32`` heatmaps in [0, 1] for uint8 batches,
  one traced graph (thread-safe, like ``CarClassifier``). Works on a trainable, fused or bfloat16 network.
- ``heatmap_to_region(heatmap, width, height, resize_mode)``: undo the model's resize, so the heatmap lies
  over the region of the photo the network saw (``"pad"`` letterboxing is cut away again).
- ``overlay_heatmap(image, heatmap)``: the photo with the heatmap blended on top (JET colours: red = most
  influence on the score, blue = none).

Kept out of ``carclf_flavor``: a served model never computes gradients, and the pipeline may import the
flavor, never the other way round. Imports Keras/TensorFlow, numpy and OpenCV only.
"""

from __future__ import annotations

import numpy as np

# Share of the overlay's colour that comes from the heatmap (the rest is the photo).
OVERLAY_ALPHA = 0.45


def feature_map(model):
    """The last convolutional feature map of ``model``: the tensor its ``GlobalAveragePooling2D`` reads."""
    import keras

    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if not pools:
        raise ValueError(f"model {model.name!r} has no GlobalAveragePooling2D: cannot find its last feature map")
    return pools[-1].input


def _head_dense(model):
    import keras

    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ValueError(f"model {model.name!r} has no Dense head")
    return dense[-1]


class GradCAM:
    """Grad-CAM of a carclf network (uint8 (S, S, 3) in, class probabilities out) for chosen classes."""

    def __init__(self, model):
        import keras
        import tensorflow as tf

        features = feature_map(model)
        head = _head_dense(model)
        # e.g. "conv5_block2_out": what the heatmap is computed on (shown on the demo page).
        self.layer_name = features._keras_history.operation.name
        # The heatmap's real resolution (input size / 32 for a ResNet: 7x7 at 224 px); it is enlarged smoothly.
        self.map_size = (int(features.shape[1]), int(features.shape[2]))
        self.image_size = int(model.inputs[0].shape[1])
        # One forward pass that yields the feature map and what the head reads; the logits are recomputed
        # from the head's weights so that its softmax is left out.
        self._model = keras.Model(model.inputs, [features, head.input])
        kernel, bias = head.kernel, head.bias
        size = self.image_size

        def compute(pixels, class_ids):
            with tf.GradientTape() as tape:
                features, head_input = self._model(pixels, training=False)
                tape.watch(features)
                logits = tf.matmul(tf.cast(head_input, tf.float32), tf.cast(kernel, tf.float32))
                if bias is not None:
                    logits = logits + tf.cast(bias, tf.float32)
                scores = tf.gather(logits, class_ids, axis=1, batch_dims=1)
            grads = tf.cast(tape.gradient(scores, features), tf.float32)
            features = tf.cast(features, tf.float32)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # alpha_k per image
            return tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))  # (N, h, w)

        self._compute = tf.function(
            compute,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8), tf.TensorSpec([None], tf.int32)],
            reduce_retracing=False,
        )

    def feature_maps(self, pixels: np.ndarray, class_ids) -> np.ndarray:
        """The raw class-activation maps at feature-map resolution, (N, h, w) float32, not normalised."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        class_ids = np.asarray(class_ids, dtype=np.int32).reshape(-1)
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"pixels must be (N, {self.image_size}, {self.image_size}, 3) uint8, got {pixels.shape}")
        if len(class_ids) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(class_ids)} class ids")
        if len(pixels) == 0:
            return np.zeros((0, 1, 1), np.float32)
        return self._compute(pixels, class_ids).numpy()

    def __call__(self, pixels: np.ndarray, class_ids) -> np.ndarray:
        """(N, S, S) float32 heatmaps in [0, 1] (each divided by its own maximum; all zero when nothing
        raised the score), enlarged bilinearly from the feature map to the input size."""
        import cv2

        maps = self.feature_maps(pixels, class_ids)
        size = self.image_size
        out = np.zeros((len(maps), size, size), np.float32)
        for i, cam in enumerate(maps):
            peak = float(cam.max())
            if peak > 0:
                out[i] = cv2.resize(cam / peak, (size, size), interpolation=cv2.INTER_LINEAR)
        return np.clip(out, 0.0, 1.0)


def heatmap_to_region(heatmap: np.ndarray, width: int, height: int, resize_mode: str = "stretch") -> np.ndarray:
    """A heatmap over the model's (S, S) input -> (height, width) over the source region it was made from."""
    import cv2

    heatmap = np.asarray(heatmap, np.float32)
    if resize_mode == "pad":
        # The input was the region letterboxed into a square (centred): enlarge, then cut the bands away.
        side = max(width, height)
        square = cv2.resize(heatmap, (side, side), interpolation=cv2.INTER_LINEAR)
        top, left = (side - height) // 2, (side - width) // 2
        return np.ascontiguousarray(square[top : top + height, left : left + width])
    return cv2.resize(heatmap, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """RGB uint8 ``image`` with ``heatmap`` (any size, values in [0, 1]) blended on top in JET colours."""
    import cv2

    height, width = image.shape[:2]
    heatmap = np.asarray(heatmap, np.float32)
    if heatmap.shape != (height, width):
        heatmap = cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.uint8(np.clip(heatmap, 0, 1) * 255), cv2.COLORMAP_JET)[:, :, ::-1]
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colour.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
