"""Grad-CAM: exact on the GAP + Dense head, the same on the fused serving network, and it points at the object."""

import os
import pathlib
import shutil

import numpy as np
import pytest

from carclf.reporting.gradcam import GradCAM, feature_map, heatmap_to_region, overlay_heatmap
from helpers_resnet import varied_images

# 128 px, not 64: at 64 px ResNet-18's last feature map is 2x2 and each cell sees the whole image, so the
# heatmap cannot localise anything (measured: median own-quadrant mass 0.27, chance is 0.25). At 128 px the
# map is 4x4 and a quadrant is 2x2 of its cells. A width-0.125 network keeps training at ~30 s on 2 cores.
SIZE = 128
HALF = SIZE // 2
# Two silhouettes of the sample data that differ in shape only (colours are random per photo).
VEHICLES = (0, 6)  # sedan, bus


def _tiny_resnet(size, num_classes, width=0.25, seed=0):
    import keras

    from carclf_flavor.resnet import build_resnet
    from helpers_resnet import randomize_batchnorm_and_biases

    keras.utils.set_random_seed(seed)
    model = build_resnet(depth=18, num_classes=num_classes, image_size=size, width=width)
    randomize_batchnorm_and_biases(model, varied_images(8, size, seed=seed), seed=seed)
    return model


def test_feature_map_is_the_last_conv_stage():
    model = _tiny_resnet(64, 3)
    tensor = feature_map(model)
    assert tensor._keras_history.operation.name == "conv5_block2_out"
    assert tuple(tensor.shape[1:3]) == (2, 2)


def test_gradcam_of_the_logit_is_cam_for_a_gap_dense_head():
    """With global average pooling then Dense, d logit_c / dA_k = W[k, c] / (h w) at every position, so
    Grad-CAM must equal ReLU(sum_k W[k, c] A_k) / (h w) exactly: checks the gradient, the pooling of the
    gradients and that the softmax is left out."""
    import keras

    model = _tiny_resnet(64, 3)
    images = varied_images(4, 64, seed=5)
    classes = np.array([0, 1, 2, 1], np.int32)
    gradcam = GradCAM(model)
    maps = gradcam.feature_maps(images, classes)
    features = np.asarray(keras.Model(model.inputs, feature_map(model))(images))
    kernel = np.asarray(model.get_layer("car_model").kernel)
    expected = np.maximum(np.einsum("nhwk,kn->nhw", features, kernel[:, classes]), 0) / (2 * 2)
    assert expected.max() > 0
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-6 * expected.max())

    heat = gradcam(images, classes)
    assert heat.shape == (4, 64, 64) and heat.min() >= 0.0
    for h, m in zip(heat, maps):
        assert h.max() == pytest.approx(1.0 if m.max() > 0 else 0.0, abs=1e-6)


def test_fused_and_bfloat16_networks_give_the_same_heatmap():
    """The demo page and evaluate run Grad-CAM on the network as served (fused, maybe bf16)."""
    from carclf_flavor.resnet import fuse_for_inference

    model = _tiny_resnet(64, 3)
    images = varied_images(4, 64, seed=7)
    classes = np.argmax(np.asarray(model(images)), axis=1).astype(np.int32)
    reference = GradCAM(model)(images, classes)
    fused = GradCAM(fuse_for_inference(model, "float32"))(images, classes)
    np.testing.assert_allclose(fused, reference, atol=2e-3)
    bf16 = GradCAM(fuse_for_inference(model, "bfloat16"))(images, classes)
    assert np.abs(bf16 - reference).mean() < 0.05


def test_heatmap_to_region_undoes_stretch_and_letterbox():
    heat = np.zeros((32, 32), np.float32)
    heat[:, :16] = 1.0  # the left half of the model's input
    stretched = heatmap_to_region(heat, 80, 20, "stretch")
    assert stretched.shape == (20, 80)
    assert stretched[:, :38].min() > 0.99 and stretched[:, 42:].max() < 0.01
    # pad: an 80x20 region was letterboxed into 80x80 (bands of 30 rows above and below): the band rows are
    # cut away, and the columns map one to one.
    heat = np.zeros((32, 32), np.float32)
    heat[:10, :] = 1.0  # only (most of) the top band, which holds no photo, is hot
    padded = heatmap_to_region(heat, 80, 20, "pad")
    assert padded.shape == (20, 80) and padded.max() < 0.01


def test_overlay_colours_hot_red_and_cold_blue():
    image = np.full((10, 20, 3), 128, np.uint8)
    heat = np.zeros((10, 20), np.float32)
    heat[:, 10:] = 1.0
    out = overlay_heatmap(image, heat)
    cold, hot = out[:, :5].reshape(-1, 3).mean(0), out[:, 15:].reshape(-1, 3).mean(0)
    assert cold[2] > cold[0] + 40 and hot[0] > hot[2] + 40  # blue where nothing mattered, red where it did
    assert out.dtype == np.uint8 and out.shape == image.shape


def _quadrant_photos(count, seed):
    """Plain grey photos (with sensor noise) with one vehicle silhouette (its class) inside one random quadrant.
    A flat background, not the sample data's clutter: what the heatmap should show is then unambiguous."""
    from carclf.data.sample_data import draw_vehicle

    rng = np.random.default_rng(seed)
    images = np.empty((count, SIZE, SIZE, 3), np.uint8)
    labels = np.arange(count) % len(VEHICLES)
    quadrants = rng.integers(0, 4, count)
    for i in range(count):
        images[i] = rng.integers(118, 139, (SIZE, SIZE, 3))
        row, col = divmod(int(quadrants[i]), 2)
        w = int(rng.integers(HALF * 11 // 16, HALF * 15 // 16))
        h = int(w * 0.55)
        x1 = col * HALF + int(rng.integers(0, HALF - w + 1))
        y1 = row * HALF + int(rng.integers(0, HALF - h + 1))
        draw_vehicle(images[i], VEHICLES[labels[i]], (x1, y1, x1 + w, y1 + h), rng)
    return images, labels.astype(np.int32), quadrants


@pytest.mark.slow
def test_heatmap_mass_lies_in_the_quadrant_of_the_vehicle():
    import keras

    from carclf.training.model import set_batchnorm_momentum
    from carclf_flavor.resnet import build_resnet

    train_x, train_y, _ = _quadrant_photos(320, seed=0)
    test_x, test_y, test_q = _quadrant_photos(40, seed=1)
    keras.utils.set_random_seed(0)
    model = build_resnet(depth=18, num_classes=len(VEHICLES), image_size=SIZE, width=0.125)
    set_batchnorm_momentum(model, 0.9)  # a few hundred steps only: let the BN statistics follow
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy")
    model.fit(train_x, train_y, batch_size=16, epochs=8, verbose=0, shuffle=True)

    predicted = np.argmax(np.asarray(model.predict(test_x, verbose=0)), axis=1)
    correct = predicted == test_y
    assert correct.mean() >= 0.75, f"the network did not learn the silhouettes (test accuracy {correct.mean():.2f})"
    heat = GradCAM(model)(test_x[correct], predicted[correct].astype(np.int32))
    quads = np.stack(
        [[h[:HALF, :HALF].sum(), h[:HALF, HALF:].sum(), h[HALF:, :HALF].sum(), h[HALF:, HALF:].sum()] for h in heat]
    )
    share = quads / quads.sum(axis=1, keepdims=True)
    own = share[np.arange(len(share)), test_q[correct]]
    # Chance is 0.25 per quadrant. Measured (two training seeds): median 0.58-0.61, the vehicle's quadrant
    # the hottest in 100% of the images.
    assert np.median(own) > 0.5, np.round(own, 2)
    assert np.mean(np.argmax(share, axis=1) == test_q[correct]) >= 0.9, np.round(share, 2)


def test_gallery_of_mistakes_shows_each_image_beside_its_heatmap():
    from carclf.reporting.figures import misclassified_grid

    images = varied_images(3, 32, seed=2)
    heat = np.zeros((3, 32, 32), np.float32)
    heat[:, :, 16:] = 1.0
    with_heat = misclassified_grid(images, ["a"] * 3, ["b"] * 3, [0.9, 0.8, 0.7], heatmaps=heat)
    # Each tile is the image, a 2 px white gap and the overlay, enlarged by one whole factor.
    tile = np.hstack([images[0], np.full((32, 2, 3), 255, np.uint8), overlay_heatmap(images[0], heat[0])])
    factor = 160 // tile.shape[1] + (160 % tile.shape[1] > 0)
    big = np.repeat(np.repeat(tile, factor, 0), factor, 1)
    found = [
        (y, x)
        for y in range(with_heat.shape[0] - big.shape[0] + 1)
        for x in range(40)
        if np.array_equal(with_heat[y : y + big.shape[0], x : x + big.shape[1]], big)
    ]
    assert len(found) == 1


def test_evaluate_logs_the_gallery_with_the_heatmaps_of_the_wrong_guesses(tmp_path):
    import cv2
    import mlflow

    import carclf_flavor
    from carclf.data.hdf5_dataset import read_split, write_hdf5_split
    from carclf.reporting.figures import misclassified_grid
    from carclf.reporting.metrics import worst_mistakes
    from carclf_flavor.images import PreprocessSettings
    from entry_points.evaluate import evaluate

    classes = ["a", "b", "c"]
    settings = PreprocessSettings(image_size=64)
    images = varied_images(12, 64, seed=4)
    test = write_hdf5_split(tmp_path / "test.h5", images, np.arange(12) % 3, classes, settings)
    carclf_flavor.save_model(
        _tiny_resnet(64, 3), tmp_path / "model", classes, preprocessing=settings, inference_precision="float32"
    )
    result = evaluate(model_uri=str(tmp_path / "model"), test_data=str(test), gallery_size=4)
    predictions = result["predictions"]
    worst = worst_mistakes(predictions, 4)
    assert len(worst) >= 2  # an untrained network: most answers are wrong
    stored, labels = read_split(str(test))
    rows = predictions.indices[worst]
    classifier = carclf_flavor.load_model(str(tmp_path / "model"))
    predicted = predictions.top_classes[worst, 0]
    expected = misclassified_grid(
        stored[rows],
        [classes[c] for c in labels[rows]],
        [classes[c] for c in predicted],
        predictions.top_probs[worst, 0],
        heatmaps=GradCAM(classifier.model)(stored[rows], predicted),
    )
    local = mlflow.artifacts.download_artifacts(f"runs:/{result['run_id']}/evaluation/misclassified_gallery.png")
    np.testing.assert_array_equal(cv2.imread(local)[:, :, ::-1], expected)
    artifacts = os.environ.get("CARCLF_TEST_ARTIFACTS")
    if artifacts:
        pathlib.Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(local, pathlib.Path(artifacts) / "misclassified_gallery_with_heatmaps.png")
