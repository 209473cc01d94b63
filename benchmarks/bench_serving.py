"""Serving speed: `mlflow models serve` vs the in-process model, and bf16 (auto) vs float32 REST serving.

Same model, same run, same JPEG bytes (700x500, encoded once):
1. batch-32 throughput: REST (base64 + JSON + HTTP + MLflow's parsing) vs ``CarClassifier.predict`` in-process
   (target: REST >= 0.85x in-process);
2. single-image latency p50/p99, REST vs the in-process call (target: overhead <= 15 ms at p50);
3. REST batch-32 throughput with the auto-selected precision vs CARCLF_INFERENCE_PRECISION=float32
   (target >= 3x where the CPU has native bf16), printed beside this CPU's ceiling: the raw bf16 / float32
   3x3-convolution rate (bench_network section 5), which no served model can exceed.
   The model is saved with calibration data, so it ships an int8 network and auto serves int8 where
   the CPU has VNNI (target REST auto >= 3x REST float32); the share of a request spent decoding the photos
   is measured in-process (decode vs network on the same batch), and whether it is off the critical path:
   the pipelined call (decoding overlapped with the network, what the pyfunc runs) vs the network alone.
REST calls send a body encoded once (as a load generator does): the figures are the server's; the client's
base64+JSON encoding of a batch is measured apart, and the auto / float32 ratio is printed with it counted too.

Sizes via environment: BENCH_SERVING_DEPTH (50), BENCH_SERVING_IMAGE_SIZE (224), BENCH_SERVING_CLASSES (196),
BENCH_SERVING_BATCHES (3 timed batches of 32), BENCH_SERVING_LATENCY_N (30 single-image calls).
4. a decompression bomb (a 20000x20000 PNG, 1.2 MB encoded, 1.2 GB decoded) sent to the worker of
   `mlflow models serve -w 1`: rise of the worker's peak RSS for one request (target < 100 MB) and three at once
   (target < 300 MB), beside the rise for one ordinary 700x500 JPEG (the baseline), and the RSS left afterwards.
5. pixel budget: 1, 10 and 80 copies of a 7000x7000 PNG (143 KB encoded, 49 megapixels, under the per-photo
   limit) in one request to `mlflow models serve -w 1`, before (budgets disabled: CARCLF_MAX_REQUEST_PIXELS
   and CARCLF_MAX_DECODING_PIXELS set past any request) and after (the defaults), both in the same run: HTTP
   status, time and rise of the worker's peak RSS per request (target: 80 refused in < 1 s with < +50 MB).
   A small ResNet-18 serves it: the photos' decoding, not the network, is what is measured.
BENCH_SERVING_SECTIONS picks sections: "speed" (1-3), "bomb" (4), "budget" (5); default all three.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

from carclf.deployment.local_server import LocalServer  # noqa: E402

DEPTH = int(os.environ.get("BENCH_SERVING_DEPTH", "50"))
IMAGE_SIZE = int(os.environ.get("BENCH_SERVING_IMAGE_SIZE", "224"))
NUM_CLASSES = int(os.environ.get("BENCH_SERVING_CLASSES", "196"))
BATCHES = int(os.environ.get("BENCH_SERVING_BATCHES", "3"))
LATENCY_N = int(os.environ.get("BENCH_SERVING_LATENCY_N", "30"))
BATCH = 32
GFLOP_PER_IMAGE = {50: 8.2}  # ResNet-50 forward at 224 px (multiply-adds counted as 2 FLOP)


def photo_jpegs(count: int, width: int = 700, height: int = 500) -> list[bytes]:
    import cv2

    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([(x + 7 * i) % 256, (y + 3 * i) % 256, ((x + y) // 2) % 256], -1).astype(np.uint8)
        noise = rng.integers(0, 40, base.shape, dtype=np.uint8)
        images.append(cv2.imencode(".jpg", base + noise, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return images


class Server(LocalServer):
    """`mlflow models serve --env-manager local` on 127.0.0.1 (carclf.deployment.local_server) with extra
    environment variables."""

    def __init__(self, model_dir: pathlib.Path, **env):
        import requests

        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        try:
            super().__init__(model_dir, self.log.name, env={"PYTHONUNBUFFERED": "1", **env}, startup_timeout_s=300)
        except BaseException:
            os.unlink(self.log.name)
            raise
        self.session = requests.Session()

    def precision_line(self) -> str:
        for line in pathlib.Path(self.log.name).read_text().splitlines():
            if "carclf model serving in" in line:
                return line.split("carclf model serving in", 1)[1].strip()
        return "?"

    def predict(self, images: list[bytes], top_k: int = 5) -> list[dict]:
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(i).decode("ascii")] for i in images]},
            "params": {"top_k": top_k},
        }
        response = self.session.post(
            self.url + "/invocations", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=600
        )
        response.raise_for_status()
        return response.json()["predictions"]

    def close(self):
        self.stop(grace_s=30)
        os.unlink(self.log.name)


def bomb_section(model_dir: pathlib.Path) -> None:
    import concurrent.futures

    import requests

    from tests.helpers_hostile import PeakRSS, bomb_png, process_tree

    bomb = base64.b64encode(bomb_png(20000, 20000)).decode("ascii")
    photo = base64.b64encode(photo_jpegs(1)[0]).decode("ascii")

    def send(image_b64: str):
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image_b64]]}})
        start = time.perf_counter()
        response = requests.post(
            server.url + "/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=600
        )
        return response.status_code, response.text, time.perf_counter() - start

    server = Server(model_dir)
    try:
        worker = max(process_tree(server.process.pid), key=lambda pid: PeakRSS(pid).rss_mb())
        for _ in range(3):  # warm-up with ordinary photos only: the first bomb's own allocations are counted
            assert send(photo)[0] == 200
        with PeakRSS(worker) as normal:
            status_photo = send(photo)[0]
        with PeakRSS(worker) as one:
            status, text, seconds = send(bomb)
        with PeakRSS(worker) as three:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                statuses = [r[0] for r in pool.map(send, [bomb] * 3)]
        time.sleep(1.0)
        after = PeakRSS(worker).rss_mb()
    finally:
        server.close()
    message = json.loads(text).get("message", text) if text.startswith("{") else text
    print(
        f"bomb: 20000x20000 PNG ({len(bomb) * 3 // 4 / 1e6:.1f} MB) -> HTTP {status} in {seconds:.2f} s: "
        f"{message[:120]}"
    )
    print(f"bomb: worker RSS before {one.start_mb:7.1f} MB")
    print(f"bomb: ordinary 700x500 JPEG (HTTP {status_photo}), peak RSS rise: {normal.rise_mb:7.1f} MB  (baseline)")
    print(f"bomb: one 20000x20000 PNG, peak RSS rise:        {one.rise_mb:7.1f} MB  (target < 100 MB)")
    print(
        f"bomb: three at once (HTTP {sorted(set(statuses))}), peak RSS rise: {three.rise_mb:7.1f} MB  (target < 300 MB)"
    )
    print(
        f"bomb: worker RSS 1 s after, vs before:            {after - one.start_mb:+7.1f} MB  "
        "(target: back within 50 MB)"
    )


def budget_section(work: pathlib.Path) -> None:
    import keras
    import requests

    import carclf_flavor
    from carclf_flavor.images import PreprocessSettings
    from carclf_flavor.resnet import build_resnet
    from tests.helpers_hostile import PeakRSS, bomb_png, process_tree

    keras.utils.set_random_seed(0)
    model_dir = work / "budget_model"
    carclf_flavor.save_model(
        build_resnet(depth=18, num_classes=10, image_size=224, width=0.25),
        model_dir,
        [f"car model {i}" for i in range(10)],
        preprocessing=PreprocessSettings(image_size=224, crop="none"),
        inference_precision="float32",
    )
    png = bomb_png(7000, 7000)
    photo = base64.b64encode(png).decode("ascii")
    counts = [int(n) for n in os.environ.get("BENCH_SERVING_BUDGET_COUNTS", "1,10,80").split(",")]
    disabled = {"CARCLF_MAX_REQUEST_PIXELS": str(10**12), "CARCLF_MAX_DECODING_PIXELS": str(10**12)}
    figures = {}
    for label, env in (("after", {}), ("before", disabled)):  # after first: a timed-out "before" keeps its CPU
        server = Server(model_dir, **env)
        try:
            worker = max(process_tree(server.process.pid), key=lambda pid: PeakRSS(pid).rss_mb())
            warm = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[photo]]}})
            requests.post(server.url + "/invocations", data=warm, headers={"Content-Type": "application/json"})
            for count in counts:
                body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[photo]] * count}})
                with PeakRSS(worker) as peak:
                    start = time.perf_counter()
                    response = requests.post(
                        server.url + "/invocations",
                        data=body,
                        headers={"Content-Type": "application/json"},
                        timeout=600,
                    )
                    seconds = time.perf_counter() - start
                text = response.text
                message = (
                    json.loads(text).get("message", "") if text.startswith("{") and response.status_code != 200 else ""
                )
                figures[label, count] = (response.status_code, seconds, peak.rise_mb, message)
        finally:
            server.close()
    print(f"budget: 7000x7000 PNG, {len(png) / 1e3:.0f} KB encoded, 49.0 megapixels; before = budgets disabled")
    for count in counts:
        for label in ("before", "after"):
            status, seconds, rise, message = figures[label, count]
            print(
                f"budget: {count:3d} in one request, {label:6s}: HTTP {status} in {seconds:7.2f} s, "
                f"worker peak RSS rise {rise:+8.1f} MB  {message[:110]}"
            )
        (_, before_s, before_mb, _), (_, after_s, after_mb, _) = figures["before", count], figures["after", count]
        print(
            f"budget: {count:3d} in one request, after/before: time x{after_s / before_s:.3f}, "
            f"peak RSS rise {after_mb:+.1f} vs {before_mb:+.1f} MB"
        )
    if 80 in counts:
        status, seconds, rise, _ = figures["after", 80]
        print(f"budget: 80 refused (HTTP {status}) in {seconds:.2f} s with {rise:+.1f} MB (target: < 1 s, < +50 MB)")


def interleaved_throughput(calls: dict, batch: list[bytes], repeats: int) -> dict:
    """img/s of each call on the same batch, measured in turns so that load from other processes on the
    machine (it is shared) falls on all of them alike."""
    for call in calls.values():
        call(batch)  # warm-up: first-call allocations, oneDNN primitive creation
    spent = dict.fromkeys(calls, 0.0)
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call(batch)
            spent[name] += time.perf_counter() - start
    return {name: repeats * len(batch) / seconds for name, seconds in spent.items()}


def interleaved_latencies_ms(calls: dict, image: bytes, n: int) -> dict:
    for call in calls.values():
        for _ in range(3):
            call([image])
    out = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            start = time.perf_counter()
            call([image])
            out[name].append((time.perf_counter() - start) * 1000)
    return {name: np.array(values) for name, values in out.items()}


def decode_network_request_ms(classifier, images: list[bytes], repeats: int) -> tuple[float, float, float]:
    """Best-of-``repeats`` wall time of decoding a batch (the classifier's decode pool), of the network alone on
    it, and of the whole pipelined call (``predict``: decoding overlapped with the network, what the pyfunc runs),
    measured in turns. ``request - network`` is the decoding left on the critical path."""
    decode, network, request = float("inf"), float("inf"), float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        pixels, _ = classifier.preprocess(images)
        decode = min(decode, time.perf_counter() - start)
        start = time.perf_counter()
        classifier.predict_pixels(pixels)
        network = min(network, time.perf_counter() - start)
        start = time.perf_counter()
        classifier.predict(images)
        request = min(request, time.perf_counter() - start)
    return decode * 1000, network * 1000, request * 1000


def request_body(images: list[bytes], top_k: int = 5) -> bytes:
    """The JSON a client sends for ``images`` (base64 in ``dataframe_split``)."""
    data = [[base64.b64encode(i).decode("ascii")] for i in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}, "params": {"top_k": top_k}}).encode()


def client_encoding_ms(images: list[bytes], repeats: int) -> float:
    """Best-of time a client spends base64+JSON encoding a batch (not part of the server's time)."""
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        request_body(images)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def rest_caller(server):
    """Calls that POST a batch to ``server`` with its body encoded once, as a load generator sends it: the
    figures are the server's (JSON parsing, base64, decoding, network, response), not the client's encoding."""
    import requests

    session = requests.Session()
    bodies = {}

    def call(images: list[bytes]) -> list[dict]:
        key = tuple(map(id, images))
        if key not in bodies:
            bodies[key] = request_body(images)
        response = session.post(
            server.url + "/invocations", data=bodies[key], headers={"Content-Type": "application/json"}, timeout=600
        )
        response.raise_for_status()
        return response.json()["predictions"]

    return call


def base64_decoder() -> str:
    """The served model's base64 decoder (carclf_flavor.pyfunc) and the instruction set it runs on."""
    try:
        import pybase64
    except ImportError:
        return "binascii (pybase64 not installed)"
    return f"pybase64 {pybase64.get_version()}"


def main() -> int:
    import keras

    import carclf_flavor
    from carclf_flavor.images import PreprocessSettings
    from carclf_flavor.precision import ENV_VAR
    from carclf_flavor.resnet import build_resnet

    print(
        f"bench_serving: ResNet-{DEPTH} at {IMAGE_SIZE} px, {NUM_CLASSES} classes, batch {BATCH} of 700x500 JPEGs, "
        f"{BATCHES} timed batches, {LATENCY_N} latency calls; CPUs: {os.cpu_count()}; base64: {base64_decoder()}"
    )
    sections = set(os.environ.get("BENCH_SERVING_SECTIONS", "speed,bomb,budget").split(","))
    if "budget" in sections:
        budget_work = pathlib.Path(tempfile.mkdtemp(prefix="bench_serving_budget_"))
        try:
            budget_section(budget_work)
        finally:
            shutil.rmtree(budget_work, ignore_errors=True)
        if not sections & {"speed", "bomb"}:
            return 0
    keras.utils.set_random_seed(0)
    network = build_resnet(depth=DEPTH, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_serving_"))
    model_dir = work / "model"
    carclf_flavor.save_model(
        network,
        model_dir,
        [f"car model {i}" for i in range(NUM_CLASSES)],
        preprocessing=PreprocessSettings(image_size=IMAGE_SIZE, crop="none"),
        inference_precision="auto",
        # an int8 network (random weights: nothing to validate against, so it
        # ships with the "not validated" warning; tests/test_int8.py validates a trained one)
        calibration_data=np.random.default_rng(1).integers(0, 256, (32, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
    )
    del network
    if "bomb" in sections:
        bomb_section(model_dir)
    if "speed" not in sections:
        shutil.rmtree(work, ignore_errors=True)
        return 0
    images = photo_jpegs(BATCH)

    os.environ.pop(ENV_VAR, None)
    local = carclf_flavor.load_model(str(model_dir))
    # Both servers run at once (idle while not measured) so that every figure comes from the same minutes.
    auto = Server(model_dir)
    fp32 = Server(model_dir, **{ENV_VAR: "float32"})
    try:
        auto_precision, fp32_precision = auto.precision_line(), fp32.precision_line()
        rates = interleaved_throughput(
            {"local": lambda b: local.predict(b), "auto": rest_caller(auto), "fp32": rest_caller(fp32)},
            images,
            BATCHES,
        )
        lat = interleaved_latencies_ms(
            {"local": lambda b: local.predict(b), "rest": rest_caller(auto)}, images[0], LATENCY_N
        )
        decode_ms, network_ms, request_ms = decode_network_request_ms(local, images, max(5, BATCHES))
        encoding_ms = client_encoding_ms(images, BATCHES)
    finally:
        auto.close()
        fp32.close()
        shutil.rmtree(work, ignore_errors=True)
    from benchmarks.bench_network import raw_conv_tflops

    ceiling = raw_conv_tflops("bfloat16") / raw_conv_tflops("float32")  # after the servers are gone: idle CPU
    local_batch, rest_batch, rest_fp32 = rates["local"], rates["auto"], rates["fp32"]
    local_lat, rest_lat = lat["local"], lat["rest"]

    gflop = GFLOP_PER_IMAGE.get(DEPTH) if IMAGE_SIZE == 224 else None

    def tflops(rate):
        return f", {rate * gflop / 1000:.2f} TFLOP/s" if gflop else ""

    print(f"served precision (auto): {auto_precision}")
    print(f"served precision (forced): {fp32_precision}")
    print(f"batch {BATCH} in-process CarClassifier.predict: {local_batch:8.1f} img/s{tflops(local_batch)}")
    print(f"batch {BATCH} REST, auto precision:              {rest_batch:8.1f} img/s{tflops(rest_batch)}")
    print(f"batch {BATCH} REST, float32 forced:              {rest_fp32:8.1f} img/s{tflops(rest_fp32)}")
    print(f"ratio REST / in-process (batch {BATCH}):          {rest_batch / local_batch:8.2f}  (target >= 0.85)")
    print(
        f"ratio REST auto / REST float32 (batch {BATCH}):   {rest_batch / rest_fp32:8.2f}  "
        f"(target >= 3; this CPU's ceiling: raw bf16 / f32 conv x{ceiling:.2f}, for bf16)"
    )
    with_client = [BATCH / (BATCH / rate + encoding_ms / 1000) for rate in (rest_batch, rest_fp32)]
    print(
        f"ratio REST auto / REST float32, client's encoding of each batch ({encoding_ms:.1f} ms) counted in too: "
        f"{with_client[0] / with_client[1]:8.2f}"
    )
    print(
        f"batch {BATCH} in-process ({local.precision}): decoding {decode_ms:6.1f} ms, network {network_ms:6.1f} ms: "
        f"decoding is {decode_ms / (decode_ms + network_ms):.0%} of the work"
    )
    exposed_ms = max(0.0, request_ms - network_ms)
    print(
        f"batch {BATCH} in-process ({local.precision}), decoding overlapped with the network: request "
        f"{request_ms:6.1f} ms vs network only {network_ms:6.1f} ms: decoding adds {exposed_ms:6.1f} ms "
        f"({exposed_ms / request_ms:.0%} of the request); {max(0.0, 1 - exposed_ms / decode_ms):.0%} of the "
        "decoding overlaps the network"
    )
    p50_local, p99_local = np.percentile(local_lat, [50, 99])
    p50_rest, p99_rest = np.percentile(rest_lat, [50, 99])
    print(f"single image in-process: p50 {p50_local:7.1f} ms  p99 {p99_local:7.1f} ms")
    print(f"single image REST:       p50 {p50_rest:7.1f} ms  p99 {p99_rest:7.1f} ms")
    print(
        f"REST overhead:           p50 {p50_rest - p50_local:7.1f} ms  p99 {p99_rest - p99_local:7.1f} ms  "
        f"(target <= 15 ms at p50)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
