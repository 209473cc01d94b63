"""The demo page for real: `mlflow run . -e demo` on 127.0.0.1, driven by a headless Chromium (Selenium), its
answers checked against a real `mlflow models serve` of the same registered model."""

import base64
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import requests

from carclf.compute.ports import free_port
from carclf.deployment.local_server import wait_until_serving
from carclf_flavor.signature import top_k_entries
from conftest import REPO_ROOT
from helpers_flavor import CLASS_NAMES
from helpers_processes import stop_process_group

MODEL_NAME = "carclf-demo"
MODEL_URI = f"models:/{MODEL_NAME}/1"
START_TIMEOUT_S = 300
# Small limits so that the page's refusals can be tested with small files.
MAX_FILES = 3
MAX_UPLOAD_MB = 0.5

# 128 px: the last feature map is 4x4, so the screenshot shows a heatmap with structure (1x1 at 32 px).
IMAGE_SIZE = 128

pytestmark = pytest.mark.slow


def _random_resnet(seed=3):
    """A small untrained ResNet-18 with realistic BN statistics and logits spread like a trained head's."""
    import keras

    from carclf_flavor.resnet import build_resnet
    from helpers_resnet import randomize_batchnorm_and_biases, varied_images

    keras.utils.set_random_seed(seed)
    model = build_resnet(depth=18, num_classes=len(CLASS_NAMES), image_size=IMAGE_SIZE, width=0.25)
    sample = varied_images(16, IMAGE_SIZE, seed=seed)
    randomize_batchnorm_and_biases(model, sample, seed=seed)
    head = model.get_layer("car_model")
    kernel, bias = head.get_weights()
    logits = np.asarray(keras.Model(model.inputs, model.get_layer("avg_pool").output)(sample)) @ kernel
    head.set_weights([kernel * (1.5 / (logits.std() + 1e-12)), np.zeros_like(bias)])
    return model


def _env(uri):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AZUREML_"))}
    env.update(
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_REGISTRY_URI=uri,
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
        # `mlflow run` and `mlflow models serve` start `python` / `uvicorn` by name: this venv first.
        PATH=os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    return env


def _start(argv, log_path, env, cwd):
    log = open(log_path, "wb")
    process = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=str(cwd),
        start_new_session=True,
    )
    process.log_path = log_path
    return process


def _wait_up(url, process, deadline):
    problem = wait_until_serving(process, url.removesuffix("/ping"), max(0.0, deadline - time.monotonic()))
    if problem:
        pytest.fail(f"{problem}:\n{process.log_path.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A registered tiny model, the demo page through the MLproject entry point and a REST server of it."""
    import mlflow

    import carclf_flavor
    from carclf_flavor.images import PreprocessSettings

    base = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        with mlflow.start_run():
            carclf_flavor.log_model(
                _random_resnet(),
                "model",
                CLASS_NAMES,
                preprocessing=PreprocessSettings(image_size=IMAGE_SIZE, crop="bbox", crop_margin=4),
                inference_precision="float32",
                registered_model_name=MODEL_NAME,
            )
    env = _env(uri)
    demo_port, rest_port = free_port(), free_port()
    mlflow_cli = str(pathlib.Path(sys.executable).with_name("mlflow"))
    demo = _start(
        [
            mlflow_cli,
            "run",
            str(REPO_ROOT),
            "-e",
            "demo",
            "--env-manager",
            "local",
            "-P",
            f"model_uri={MODEL_URI}",
            "-P",
            f"port={demo_port}",
            "-P",
            f"max_files={MAX_FILES}",
            "-P",
            f"max_upload_mb={MAX_UPLOAD_MB}",
        ],
        base / "demo.log",
        env,
        base,
    )
    rest = _start(
        [
            mlflow_cli,
            "models",
            "serve",
            "-m",
            MODEL_URI,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(rest_port),
            "-w",
            "1",
        ],
        base / "rest.log",
        env,
        base,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        _wait_up(f"http://127.0.0.1:{demo_port}/ping", demo, deadline)
        _wait_up(f"http://127.0.0.1:{rest_port}/ping", rest, deadline)
        yield {
            "demo": f"http://127.0.0.1:{demo_port}",
            "rest": f"http://127.0.0.1:{rest_port}",
            "base": base,
            "demo_process": demo,
        }
    finally:
        stop_process_group(demo)
        stop_process_group(rest)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver: "
            "apt-get install -y chromium chromium-driver (.ci/run installs them)"
        )
    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1360,1000",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        "--disable-default-apps",
        "--no-pings",
        # Nothing past loopback: every other address goes to a proxy that does not exist.
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1;localhost",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _sample_photo(path, class_id=1, seed=7):
    """A photo of the project's sample data (a drawn vehicle on a background), written as a real JPEG."""
    from carclf.data.sample_data import render_photo

    image, _ = render_photo(class_id, np.random.default_rng(seed), min_width=300, max_width=340)
    ok, encoded = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


def _rest_answer(servers, photo: bytes, bbox=None):
    columns, row = ["image"], [base64.b64encode(photo).decode("ascii")]
    if bbox is not None:
        columns += ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
        row += list(bbox)
    response = requests.post(
        f"{servers['rest']}/invocations",
        timeout=60,
        data=json.dumps({"dataframe_split": {"columns": columns, "data": [row]}}),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def _open(browser, servers):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(servers["demo"] + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").get_attribute("data-ready") == "true")


def _upload(browser, *paths):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "picker").send_keys("\n".join(str(p) for p in paths))


def _card_when_settled(browser, name, timeout=90):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    selector = f'.card[data-name="{name}"]'
    WebDriverWait(browser, timeout).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, selector)
            and d.find_element(By.CSS_SELECTOR, selector).get_attribute("data-state") in ("done", "error")
        )
    )
    return browser.find_element(By.CSS_SELECTOR, selector)


def _save_screenshot(browser, tmp_path, name):
    path = tmp_path / name
    assert browser.save_screenshot(str(path)), "the browser did not write a screenshot"
    artifacts = os.environ.get("CARCLF_TEST_ARTIFACTS")
    if artifacts:
        pathlib.Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, pathlib.Path(artifacts) / name)
    return path


def test_page_answers_like_rest_with_and_without_a_box(servers, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = _sample_photo(tmp_path / "sample_car.jpg")
    _open(browser, servers)
    header = browser.find_element(By.ID, "model").text
    for fact in (
        f"Model {MODEL_NAME}",
        "version 1",
        "precision float32",
        f"input {IMAGE_SIZE} px, crop bbox",
        f"{len(CLASS_NAMES)} classes",
    ):
        assert fact in header, header

    _upload(browser, photo)
    card = _card_when_settled(browser, photo.name)
    assert card.get_attribute("data-state") == "done", card.text
    expected = _rest_answer(servers, photo.read_bytes())
    assert card.find_element(By.CSS_SELECTOR, ".top1-label").text == expected["label"]
    assert card.find_element(By.CSS_SELECTOR, ".top1-prob").text == f"{100 * expected['prob']:.1f}%"
    rows = card.find_elements(By.CSS_SELECTOR, ".top5 li")
    assert [r.find_element(By.CSS_SELECTOR, ".name").get_attribute("title") for r in rows] == [
        e["label"] for e in top_k_entries(expected["top_k"])
    ]
    assert "classified in" in card.find_element(By.CSS_SELECTOR, ".timing").text
    heatmap = card.find_element(By.CSS_SELECTOR, "img.heatmap")
    WebDriverWait(browser, 10).until(lambda d: browser.execute_script("return arguments[0].naturalWidth", heatmap) > 0)
    # No box: the heatmap covers the whole photo (the region the network saw), at the photo's aspect ratio.
    width, height = cv2.imdecode(np.frombuffer(photo.read_bytes(), np.uint8), cv2.IMREAD_COLOR).shape[1::-1]
    shown = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", heatmap)
    assert abs(shown[0] / shown[1] - width / height) < 0.02, (shown, width, height)

    # A box dragged over the upper-left part of the photo: sent in source pixels, the same answer as REST's.
    source = card.find_element(By.CSS_SELECTOR, "img.source")
    w, h = source.size["width"], source.size["height"]
    ActionChains(browser).move_to_element_with_offset(source, -w // 2 + 5, -h // 2 + 5).click_and_hold().move_by_offset(
        int(w * 0.6), int(h * 0.7)
    ).release().perform()
    WebDriverWait(browser, 90).until(
        lambda d: card.get_attribute("data-bbox") and card.get_attribute("data-state") == "done"
    )
    bbox = [int(v) for v in card.get_attribute("data-bbox").split(",")]
    assert 0 <= bbox[0] < 15 and 0 <= bbox[1] < 15, bbox
    assert bbox[2] == pytest.approx(width * 0.6 + 5 * width / w, abs=0.05 * width), (bbox, width)
    assert bbox[3] == pytest.approx(height * 0.7 + 5 * height / h, abs=0.05 * height), (bbox, height)
    boxed = _rest_answer(servers, photo.read_bytes(), bbox)
    assert card.find_element(By.CSS_SELECTOR, ".top1-label").text == boxed["label"]
    assert card.find_element(By.CSS_SELECTOR, ".top1-prob").text == f"{100 * boxed['prob']:.1f}%"
    assert boxed["prob"] != expected["prob"]  # the box really changed what the network saw
    assert "Box " in card.find_element(By.CSS_SELECTOR, ".box-text").text

    # A non-image next to it: its own card says why, the car's card is untouched.
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    _upload(browser, notes)
    bad = _card_when_settled(browser, notes.name)
    assert bad.get_attribute("data-state") == "error"
    from carclf_flavor.images import ImageDecodeError, PreprocessSettings, prepare_photo

    with pytest.raises(ImageDecodeError) as problem:  # the flavor's own words for these bytes
        prepare_photo(notes.read_bytes(), None, PreprocessSettings(image_size=IMAGE_SIZE))
    assert str(problem.value).startswith("not a recognised image format")
    assert bad.find_element(By.CSS_SELECTOR, ".error").text == f"notes.txt: {problem.value}"
    assert card.get_attribute("data-state") == "done"
    screenshot = _save_screenshot(browser, tmp_path, "demo_page.png")
    picture = cv2.imread(str(screenshot))
    assert picture is not None and picture.shape[0] > 500 and picture.std() > 10


_DROP_FILES_JS = """
const [files, target] = arguments;
const transfer = new DataTransfer();
for (const [name, data] of files) {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
}
for (const type of ["dragenter", "dragover", "drop"]) {
  target.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
}
"""


def test_several_photos_dropped_on_the_page_each_get_their_answer(servers, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, servers)
    photos = [_sample_photo(tmp_path / f"drop{i}.jpg", class_id=i, seed=20 + i) for i in range(MAX_FILES)]
    files = [[p.name, base64.b64encode(p.read_bytes()).decode("ascii")] for p in photos]
    browser.execute_script(_DROP_FILES_JS, files, browser.find_element(By.ID, "drop"))
    for photo in photos:
        card = _card_when_settled(browser, photo.name)
        assert card.get_attribute("data-state") == "done", card.text
        assert (
            card.find_element(By.CSS_SELECTOR, ".top1-label").text == _rest_answer(servers, photo.read_bytes())["label"]
        )
    assert len(browser.find_elements(By.CSS_SELECTOR, ".card")) == MAX_FILES


def test_limits_are_clear_messages_and_the_server_stays_up(servers, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, servers)
    photos = [_sample_photo(tmp_path / f"car{i}.jpg", class_id=i, seed=i) for i in range(MAX_FILES + 1)]
    _upload(browser, *photos)
    notice = browser.find_element(By.ID, "notice")
    assert notice.is_displayed()
    assert notice.text == (
        f"Too many files: {MAX_FILES + 1} selected, the limit is {MAX_FILES} at a time. "
        "Nothing was uploaded; choose fewer."
    )
    assert not browser.find_elements(By.CSS_SELECTOR, ".card")

    big = tmp_path / "huge.jpg"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, int(0.8 * 1024 * 1024), np.uint8))
    _upload(browser, big)
    card = _card_when_settled(browser, big.name, timeout=10)
    assert (
        card.find_element(By.CSS_SELECTOR, ".error").text
        == "huge.jpg is 0.8 MB, above the limit of 0.5 MB per photo: it was not uploaded."
    )
    assert not notice.is_displayed()

    # The server enforces the limit itself (413, one line), and bad requests do not take it down.
    predict = f"{servers['demo']}/api/predict"
    response = requests.post(predict, params={"name": "huge.jpg"}, data=big.read_bytes(), timeout=60)
    assert response.status_code == 413
    assert response.json() == {"error": "huge.jpg: the file is 0.8 MB, above the 0.5 MB limit per photo"}
    response = requests.post(predict, params={"name": "car0.jpg", "x1": 5, "y1": 5, "x2": 4}, data=b"x", timeout=60)
    assert response.status_code == 400 and response.json() == {"error": "car0.jpg: box is incomplete: y2 missing"}
    response = requests.post(
        predict,
        params={"name": "car0.jpg", "x1": 900, "y1": 5, "x2": 990, "y2": 40},
        data=photos[0].read_bytes(),
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("car0.jpg: bbox (900, 5, 990, 40) lies outside the ")
    response = requests.post(predict, params={"name": "empty.jpg"}, data=b"", timeout=60)
    assert response.json() == {"error": "empty.jpg: the file is empty (0 bytes)"}
    truncated = photos[0].read_bytes()[:2000]
    response = requests.post(predict, params={"name": "cut.jpg"}, data=truncated, timeout=60)
    assert response.status_code == 400 and response.json()["error"].startswith("cut.jpg: ")
    assert servers["demo_process"].poll() is None
    good = requests.post(predict, params={"name": "car1.jpg"}, data=photos[1].read_bytes(), timeout=60)
    assert good.status_code == 200
    assert good.json()["label"] == _rest_answer(servers, photos[1].read_bytes())["label"]


def test_cli_gives_one_line_errors(tmp_path, capsys):
    import socket

    from entry_points import demo as demo_module

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert demo_module.main(["--model-uri", str(tmp_path), "--port", str(port)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: port {port} on 127.0.0.1 is already in use: pass another port (-P port=...)\n"
    )
    assert demo_module.main(["--model-uri", str(tmp_path / "missing"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'missing'}: ") and err.count("\n") == 1, err
    assert demo_module.main(["--model-uri", "m", "--max-files", "0"]) == 2
    assert capsys.readouterr().err == "error: max_files must be >= 1, got 0\n"
