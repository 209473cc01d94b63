"""The pictures every step logs: image grids at the stored pixels, and the SVG bar chart."""

import xml.etree.ElementTree as ET

import numpy as np

from carclf.reporting.figures import MIN_TILE_PX, image_grid, misclassified_grid, stacked_bar_svg

SVG = "{http://www.w3.org/2000/svg}"


def test_image_grid_shows_each_image_at_its_own_pixels_enlarged_by_a_whole_factor():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    grid = image_grid(images + [None], [["first"], ["second"], ["third"], []], cols=2)
    factor = MIN_TILE_PX // 32  # 5: each source pixel is a 5x5 block, no interpolation
    white = np.full((32 * factor, 32 * factor, 3), 255, np.uint8)
    tiles = find_tiles(grid, images, factor)
    assert len(tiles) == 3
    (y0, x0), (y1, x1), (y2, x2) = tiles
    assert y0 == y1 < y2 and x0 == x2 < x1  # row-major, two columns
    # the empty cell (row 2, column 2) is blank, and every caption band has text in it
    assert np.array_equal(grid[y2 : y2 + 32 * factor, x1 : x1 + 32 * factor], white)
    for y, x in tiles:
        band = grid[y + 32 * factor : y + 32 * factor + 14, x : x + 32 * factor]
        assert (band < 128).any()


def find_tiles(grid, images, factor):
    """(y, x) of each image's enlarged copy in ``grid`` (exact pixel match)."""
    found = []
    for image in images:
        big = np.repeat(np.repeat(image, factor, 0), factor, 1)
        ys, xs = np.nonzero(np.all(grid == big[0, 0], axis=-1))
        hits = [
            (y, x)
            for y, x in zip(ys, xs)
            if y + big.shape[0] <= grid.shape[0]
            and x + big.shape[1] <= grid.shape[1]
            and np.array_equal(grid[y : y + big.shape[0], x : x + big.shape[1]], big)
        ]
        assert len(hits) == 1, len(hits)
        found.append(hits[0])
    return found


def test_large_images_are_not_enlarged_and_long_captions_stay_inside_their_tile():
    image = np.zeros((200, 200, 3), np.uint8)
    grid = image_grid([image, image], [["x" * 300], ["y"]], cols=2, title="t")
    assert grid.shape[1] < 2 * 200 + 3 * 20  # factor 1, caption cut to the tile's width
    assert misclassified_grid(np.zeros((0, 8, 8, 3), np.uint8), [], [], []).ndim == 3


def test_stacked_bar_svg_draws_one_segment_per_category_and_series_with_heights_in_proportion():
    counts = {"train": [5, 0, 12], "val": [1, 2, 3]}
    svg = stacked_bar_svg(["Audi <TT>", "BMW & M3", "Fiat"], counts, title="Images per class")
    root = ET.fromstring(svg)  # well-formed: names are escaped
    bars = [
        (r.find(f"{SVG}title").text, float(r.get("height"))) for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"
    ]
    assert [title for title, _ in bars] == [
        "Audi <TT>: train 5",
        "Audi <TT>: val 1",
        "BMW & M3: val 2",
        "Fiat: train 12",
        "Fiat: val 3",
    ]  # zero counts draw nothing
    per_image = {height / int(title.rsplit(" ", 1)[1]) for title, height in bars}
    assert max(per_image) - min(per_image) < 0.01  # coordinates are written to 2 decimals
    legend = [t.text for t in root.iter(f"{SVG}text") if t.text and t.text.startswith(("train", "val"))]
    assert legend == ["train (17)", "val (6)"]


def test_stacked_bar_svg_with_many_classes_labels_every_tenth_index():
    names = [f"car {i}" for i in range(196)]
    svg = stacked_bar_svg(names, {"train": np.ones(196, int)}, title="t")
    texts = [t.text for t in ET.fromstring(svg).iter(f"{SVG}text")]
    assert "car 5" not in texts and {"0", "10", "190"} <= set(texts) and "195" not in texts


def test_log_png_stores_the_exact_pixels_as_a_run_artifact():
    import cv2
    import mlflow

    from carclf.reporting.figures import log_png

    picture = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    with mlflow.start_run() as run:
        log_png(picture, "pictures/grid.png")
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/pictures/grid.png")
    np.testing.assert_array_equal(cv2.imread(local)[:, :, ::-1], picture)  # lossless, RGB order kept
