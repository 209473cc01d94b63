"""The carclf MLflow flavor in-process: save -> load -> predict, pyfunc contract, bad input, metadata."""

import json
import threading

import numpy as np
import pandas as pd
import pytest
import yaml

import carclf_flavor
from carclf_flavor.images import PreprocessSettings, prepare_photo
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes, varied_format_images, write_cars_meta

SETTINGS = PreprocessSettings(image_size=IMAGE_SIZE, crop="bbox", crop_margin=4, resize_mode="stretch")


@pytest.fixture(scope="module")
def keras_model():
    return build_tiny_resnet(seed=0)


@pytest.fixture(scope="module")
def saved_model(keras_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("flavor") / "model"
    carclf_flavor.save_model(keras_model, path, CLASS_NAMES, preprocessing=SETTINGS, inference_precision="float32")
    return path


@pytest.fixture(scope="module")
def classifier(saved_model):
    return carclf_flavor.load_model(str(saved_model))


@pytest.fixture(scope="module")
def pyfunc_model(saved_model):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(saved_model))


def reference_probs(keras_model, images, bboxes=None):
    """The unfused float32 network on exactly the pixels training would have produced."""
    bboxes = bboxes or [None] * len(images)
    pixels = np.stack([prepare_photo(data, bbox, SETTINGS) for data, bbox in zip(images, bboxes)])
    return np.asarray(keras_model(pixels, training=False))


IMAGES = [jpeg_bytes(80 + 10 * i, 60 + 7 * i, seed=i) for i in range(6)]


def test_round_trip_matches_the_unfused_network_on_training_pixels(keras_model, classifier):
    results = classifier.predict(IMAGES, top_k=3)
    expected = reference_probs(keras_model, IMAGES)
    assert len(results) == len(IMAGES)
    for result, probs in zip(results, expected):
        best = int(np.argmax(probs))
        assert result["class_id"] == best
        assert result["label"] == CLASS_NAMES[best]
        assert result["prob"] == pytest.approx(float(probs[best]), abs=1e-4)
        assert [entry["label"] for entry in result["top_k"]] == [CLASS_NAMES[i] for i in np.argsort(-probs)[:3]]
        assert [entry["prob"] for entry in result["top_k"]] == pytest.approx(sorted(probs, reverse=True)[:3], abs=1e-4)


def test_uint8_arrays_and_bytes_give_the_same_answer(classifier):
    import cv2

    rgb = cv2.imdecode(np.frombuffer(IMAGES[0], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].copy()
    from_array = classifier.predict(rgb, top_k=2)[0]
    from_bytes = classifier.predict(IMAGES[0], top_k=2)[0]
    assert from_array["class_id"] == from_bytes["class_id"]
    assert from_array["prob"] == pytest.approx(from_bytes["prob"], abs=1e-3)


def test_pyfunc_output_columns_types_and_top_k_ordering(pyfunc_model, keras_model):
    frame = pyfunc_model.predict(pd.DataFrame({"image": IMAGES}), params={"top_k": 4})
    assert list(frame.columns) == ["label", "class_id", "prob", "top_k", "error"]
    expected = reference_probs(keras_model, IMAGES)
    for row, probs in zip(frame.itertuples(index=False), expected):
        assert isinstance(row.prob, float) and isinstance(row.class_id, (int, np.integer))
        assert row.class_id == int(np.argmax(probs))
        assert isinstance(row.top_k, str) and row.error is None  # the signature's plain string column
        top_k = json.loads(row.top_k)
        assert len(top_k) == 4
        ranked = [entry["prob"] for entry in top_k]
        assert ranked == sorted(ranked, reverse=True)
        assert top_k[0] == {"label": row.label, "prob": row.prob}
        assert sum(ranked) == pytest.approx(1.0, abs=1e-4)  # 4 classes: top-4 is everything


def test_top_k_format_list_gives_the_same_ranking_as_a_nested_list(pyfunc_model):
    frame = pd.DataFrame({"image": IMAGES[:3]})
    as_json = pyfunc_model.predict(frame, params={"top_k": 3})
    as_list = pyfunc_model.predict(frame, params={"top_k": 3, "top_k_format": "list"})
    assert [json.loads(text) for text in as_json.top_k] == list(as_list.top_k)
    assert all(isinstance(entry, list) and len(entry) == 3 for entry in as_list.top_k)
    assert as_json.drop(columns="top_k").equals(as_list.drop(columns="top_k"))


def test_top_k_larger_than_class_count_is_capped(pyfunc_model):
    frame = pyfunc_model.predict(pd.DataFrame({"image": IMAGES[:1]}), params={"top_k": 50})
    assert len(json.loads(frame.top_k[0])) == len(CLASS_NAMES)


def test_bbox_at_serve_time_equals_the_training_crop(pyfunc_model, keras_model):
    image = jpeg_bytes(160, 120, seed=7)
    bboxes = [(10, 20, 90, 100), (60, 5, 150, 70)]
    frame = pyfunc_model.predict(
        pd.DataFrame(
            {
                "image": [image, image],
                "bbox_x1": [b[0] for b in bboxes],
                "bbox_y1": [b[1] for b in bboxes],
                "bbox_x2": [b[2] for b in bboxes],
                "bbox_y2": [b[3] for b in bboxes],
            }
        ),
        params={"top_k": 4, "top_k_format": "list"},
    )
    expected = reference_probs(keras_model, [image, image], bboxes)
    whole = reference_probs(keras_model, [image])[0]
    for row, probs in zip(frame.itertuples(index=False), expected):
        got = {entry["label"]: entry["prob"] for entry in row.top_k}
        assert [got[name] for name in CLASS_NAMES] == pytest.approx(list(probs), abs=1e-4)
    # The crop really changed the pixels the network saw.
    assert not np.allclose(expected[0], whole, atol=1e-5)


def test_varied_formats_are_valid_input(pyfunc_model):
    images = varied_format_images()
    frame = pyfunc_model.predict(pd.DataFrame({"image": list(images.values())}))
    assert frame["label"].isin(CLASS_NAMES).all()


@pytest.mark.parametrize(
    "frame, params, expected",
    [
        (pd.DataFrame({"image": [IMAGES[0], b"not an image at all"]}), None, "row 1: not a recognised image format"),
        (pd.DataFrame({"image": [b""]}), None, "row 0: empty image"),
        (pd.DataFrame({"image": [IMAGES[0][: len(IMAGES[0]) // 2]]}), None, "truncated JPEG"),
        (
            pd.DataFrame(
                {"image": [IMAGES[0]], "bbox_x1": [500], "bbox_y1": [500], "bbox_x2": [600], "bbox_y2": [600]}
            ),
            None,
            "row 0: bbox (500, 500, 600, 600) lies outside the 80x60 image",
        ),
        (pd.DataFrame({"image": [IMAGES[0]]}), {"top_k": 0}, "params.top_k must be an integer >= 1"),
        (pd.DataFrame({"image": [IMAGES[0]]}), {"errors": "ignore"}, "params.errors must be one of raise, coerce"),
        (pd.DataFrame({"image": [IMAGES[0]]}), {"top_k_format": "xml"}, "params.top_k_format must be one of json"),
    ],
)
def test_bad_input_is_one_line_invalid_parameter_value(pyfunc_model, frame, params, expected):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as info:
        pyfunc_model.predict(frame, params=params)
    assert isinstance(info.value, carclf_flavor.InvalidInputError)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    assert info.value.get_http_status_code() == 400
    assert expected in info.value.message
    assert "\n" not in info.value.message


def test_pixel_limit_is_configurable_at_load(saved_model, monkeypatch):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv(carclf_flavor.MAX_PIXELS_ENV_VAR, "1000")  # 80x60 = 4800 pixels is now too many
    small_limit = mlflow.pyfunc.load_model(str(saved_model))
    with pytest.raises(MlflowException, match=r"row 0: image is 80x60 .* above the limit"):
        small_limit.predict(pd.DataFrame({"image": [IMAGES[0]]}))


def test_coerce_scores_good_rows_and_explains_bad_ones(pyfunc_model, classifier):
    frame = pyfunc_model.predict(
        pd.DataFrame({"image": [IMAGES[0], b"\x00\x01", IMAGES[1], b""]}), params={"errors": "coerce", "top_k": 2}
    )
    assert list(frame.columns) == ["label", "class_id", "prob", "top_k", "error"]
    assert frame.error[0] is None and frame.error[2] is None
    assert "not a recognised image format" in frame.error[1] and "empty image" in frame.error[3]
    assert frame.label[1] is None and frame.prob[3] is None and frame.class_id[1] is None
    assert frame.top_k[1] == "[]" and frame.top_k[3] == "[]"
    direct = classifier.predict([IMAGES[0], IMAGES[1]], top_k=2)
    assert frame.class_id[0] == direct[0]["class_id"] and frame.class_id[2] == direct[1]["class_id"]


def test_predict_is_thread_safe(classifier):
    expected = [r["top_k"] for r in classifier.predict(IMAGES, top_k=4)]
    failures = []

    def worker(offset):
        try:
            for i in range(5):
                index = (offset + i) % len(IMAGES)
                got = classifier.predict([IMAGES[index]], top_k=4)[0]["top_k"]
                if [g["label"] for g in got] != [e["label"] for e in expected[index]]:
                    failures.append((index, got))
        except Exception as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_artifact_layout_flavors_and_safe_mode(saved_model):
    import keras

    files = {p.relative_to(saved_model).as_posix() for p in saved_model.rglob("*") if p.is_file()}
    assert {
        "MLmodel",
        "data/model.keras",
        "data/classes.json",
        "data/preprocessing.json",
        "requirements.txt",
        "code/carclf_flavor/__init__.py",
        "code/carclf_flavor/images.py",
        "code/carclf_flavor/precision.py",
        "serving_input_example.json",
    } <= files
    assert not any(name.endswith((".pkl", ".pickle", ".cloudpickle")) for name in files)
    assert not any("__pycache__" in name for name in files)
    mlmodel = yaml.safe_load((saved_model / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"carclf", "python_function"}
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "carclf_flavor"
    assert mlmodel["flavors"]["carclf"]["inference_precision"] == "float32"
    assert json.loads((saved_model / "data/classes.json").read_text()) == CLASS_NAMES
    record = json.loads((saved_model / "data/preprocessing.json").read_text())
    assert PreprocessSettings.from_dict(record) == SETTINGS and record["inference_precision"] == "float32"
    import carclf_flavor.layers  # noqa: F401  registers the project's layers, as the loader does

    network = keras.saving.load_model(saved_model / "data/model.keras", safe_mode=True, compile=False)
    # Fused: no BatchNormalization left in the saved inference network.
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in network.layers)
    example = json.loads((saved_model / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]


def test_cars_meta_mat_class_names_are_converted_at_save(keras_model, tmp_path):
    meta = write_cars_meta(tmp_path / "cars_meta.mat", CLASS_NAMES)
    path = tmp_path / "model"
    carclf_flavor.save_model(keras_model, path, meta, preprocessing=SETTINGS, inference_precision="float32")
    assert json.loads((path / "data/classes.json").read_text()) == CLASS_NAMES


def test_save_refuses_mismatched_class_names_and_sizes(keras_model, tmp_path):
    with pytest.raises(ValueError, match="4 outputs but 3 class names"):
        carclf_flavor.save_model(keras_model, tmp_path / "a", CLASS_NAMES[:3])
    with pytest.raises(ValueError, match="image_size=64 but the model takes 32x32"):
        carclf_flavor.save_model(keras_model, tmp_path / "b", CLASS_NAMES, preprocessing={"image_size": 64})
    with pytest.raises(ValueError, match="inference_precision must be one of"):
        carclf_flavor.save_model(keras_model, tmp_path / "c", CLASS_NAMES, inference_precision="fp8")


def test_log_model_registers_and_loads_by_models_uri(keras_model):
    import mlflow

    with mlflow.start_run():
        info = carclf_flavor.log_model(
            keras_model,
            "model",
            CLASS_NAMES,
            preprocessing=SETTINGS,
            inference_precision="float32",
            registered_model_name="carclf-test",
        )
    assert info.signature.inputs.input_names()[0] == "image"
    loaded = carclf_flavor.load_model("models:/carclf-test/1")
    assert loaded.class_names == CLASS_NAMES
    served = mlflow.pyfunc.load_model(info.model_uri)
    frame = served.predict(pd.DataFrame({"image": IMAGES[:2]}))
    assert list(frame.label) == [r["label"] for r in loaded.predict(IMAGES[:2])]


def test_importing_images_stays_light():
    import subprocess
    import sys

    code = "import sys, carclf_flavor.images; print(any(m in sys.modules for m in ('tensorflow', 'keras', 'mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
