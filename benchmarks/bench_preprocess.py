"""Preprocess throughput (images/s) against two baselines measured in the same run, on the same files.

- naive: one process, PIL ``open -> convert("RGB") -> resize(224x224)`` per file (what a simple script does);
- decode limit: one process ``cv2.imdecode`` (full resolution) + ``cv2.resize`` per file, times the number
  of cores: what a perfectly parallel full-resolution decoder could reach on this machine.

Ours is ``entry_points.preprocess.preprocess`` end to end (all cores, HDF5 writing, MLflow logging and plots
included), and its decode/write phase alone (the ``images_per_second`` it logs). Targets: >= 3x naive and
>= 0.8 of the decode limit.

Decode section (one thread, the same photos in memory, the three paths interleaved, best of
BENCH_DECODE_ROUNDS rounds): milliseconds per photo for ``carclf_flavor.images.prepare_photo`` (one header parse,
JPEG ``Image.draft`` at the largest scale that keeps the output size) against, measured in the same run,
- full decode: one header parse, a full-resolution decode (``cv2.imdecode``), then the same crop/resize;
- previous: the session-4 ``preprocess_image`` (the header parsed twice, OpenCV's reduced decode).

Environment: BENCH_PREPROCESS_IMAGES (default 2000) photos of BENCH_PREPROCESS_WIDTH x BENCH_PREPROCESS_HEIGHT
(700 x 500); BENCH_PREPROCESS_SIZE output size (224); BENCH_PREPROCESS_WORKERS (0 = all cores);
BENCH_DECODE_PHOTOS (200) and BENCH_DECODE_ROUNDS (3) for the decode section.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

NUM_IMAGES = int(os.environ.get("BENCH_PREPROCESS_IMAGES", "2000"))
WIDTH = int(os.environ.get("BENCH_PREPROCESS_WIDTH", "700"))
HEIGHT = int(os.environ.get("BENCH_PREPROCESS_HEIGHT", "500"))
SIZE = int(os.environ.get("BENCH_PREPROCESS_SIZE", "224"))
WORKERS = int(os.environ.get("BENCH_PREPROCESS_WORKERS", "0"))
NUM_CLASSES = 10
DISTINCT = 100  # distinct scenes; the rest are re-encoded at other qualities (decode cost is what matters)
DECODE_PHOTOS = int(os.environ.get("BENCH_DECODE_PHOTOS", "200"))
DECODE_ROUNDS = int(os.environ.get("BENCH_DECODE_ROUNDS", "3"))


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_photos(root: pathlib.Path) -> list[pathlib.Path]:
    """NUM_IMAGES JPEGs of WIDTH x HEIGHT in a folder per class (the sample scenes, resized)."""
    from carclf.data.sample_data import render_photo

    scenes = []
    for i in range(min(DISTINCT, NUM_IMAGES)):
        rng = np.random.default_rng([7, i])
        image, _ = render_photo(i % NUM_CLASSES, rng, WIDTH, WIDTH)
        scenes.append(cv2.cvtColor(cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR))
    paths = []
    for i in range(NUM_IMAGES):
        folder = root / f"class_{i % NUM_CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        ok, data = cv2.imencode(
            ".jpg", scenes[i % len(scenes)], [cv2.IMWRITE_JPEG_QUALITY, 85 + (i // len(scenes)) % 10]
        )
        path.write_bytes(data.tobytes())
        paths.append(path)
    return paths


def naive_pil(paths) -> float:
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB").resize((SIZE, SIZE)))
    return len(paths) / (time.perf_counter() - start)


def cv2_single_process(paths) -> float:
    cv2.setNumThreads(1)  # one core: the limit is this figure times the number of cores
    start = time.perf_counter()
    for path in paths:
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
        cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return len(paths) / (time.perf_counter() - start)


def _header_size(data: bytes) -> tuple[int, int]:
    """One Pillow header parse, as the flavor does before decoding (format, size, EXIF orientation)."""
    import io

    header = Image.open(io.BytesIO(data))
    header.getexif()
    return header.size


def full_decode_path(data: bytes, settings) -> np.ndarray:
    """One header parse, a full-resolution decode, then the same crop/resize as ours."""
    from carclf_flavor.images import crop_and_resize

    _header_size(data)
    image = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return crop_and_resize(image, None, settings)


_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def previous_path(data: bytes, settings) -> np.ndarray:
    """Session 4's preprocess_image: image_size_of and decode_image each parse the header, OpenCV reduced decode."""
    from carclf_flavor.images import choose_reduction, crop_and_resize

    width, height = _header_size(data)
    _header_size(data)
    reduce = choose_reduction(width, height, int(settings.image_size))
    image = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduce]), cv2.COLOR_BGR2RGB)
    return crop_and_resize(image, None, settings, source_size=(width, height))


def decode_section(paths) -> dict[str, float]:
    """Milliseconds per photo of each path, single thread, best of DECODE_ROUNDS interleaved rounds."""
    from carclf_flavor.images import PreprocessSettings, prepare_photo

    settings = PreprocessSettings(image_size=SIZE, crop="none")
    photos = [path.read_bytes() for path in paths[:DECODE_PHOTOS]]
    cv2.setNumThreads(1)
    paths_by_name = {
        "full decode": lambda data: full_decode_path(data, settings),
        "previous": lambda data: previous_path(data, settings),
        "ours": lambda data: prepare_photo(data, None, settings),
    }
    best = {name: float("inf") for name in paths_by_name}
    for _ in range(DECODE_ROUNDS):
        for name, prepare in paths_by_name.items():
            start = time.perf_counter()
            for data in photos:
                prepare(data)
            best[name] = min(best[name], (time.perf_counter() - start) * 1000 / len(photos))
    full = np.stack([full_decode_path(data, settings) for data in photos[:50]]).astype(np.int16)
    mine = np.stack([prepare_photo(data, None, settings) for data in photos[:50]]).astype(np.int16)
    best["mean abs diff"] = float(np.abs(full - mine).mean())
    return best


def ours(root: pathlib.Path, out: pathlib.Path) -> tuple[float, float]:
    import mlflow

    from entry_points.preprocess import preprocess

    mlflow.search_experiments()  # create the throwaway store's tables outside the timed part
    start = time.perf_counter()
    preprocess(
        data_dir=root,
        output_dir=out,
        image_size=SIZE,
        crop="none",
        workers=WORKERS,
        val_fraction=0.1,
        test_fraction=0.2,
    )
    end_to_end = NUM_IMAGES / (time.perf_counter() - start)
    run = mlflow.search_runs(max_results=1, output_format="list")[0]
    return end_to_end, run.data.metrics["images_per_second"]


def main() -> int:
    n_cores = cores()
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        tmp = pathlib.Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        os.chdir(tmp)  # MLflow artifacts of the throwaway store land in tmp/mlruns
        t = time.perf_counter()
        paths = make_photos(tmp / "photos")
        print(
            f"generated {len(paths)} JPEGs of {WIDTH}x{HEIGHT} in {time.perf_counter() - t:.1f} s; "
            f"output {SIZE}x{SIZE}; {n_cores} core(s)",
            flush=True,
        )
        cv2_single_process(paths[: min(100, len(paths))])  # warm the page cache and the libraries
        # Ours first: the baselines below set OpenCV to one thread in this process.
        ours_total, ours_phase = ours(tmp / "photos", tmp / "out")
        naive = naive_pil(paths)
        single = cv2_single_process(paths)
        decode = decode_section(paths)
    limit = single * n_cores
    print(f"naive PIL loop (1 process)          {naive:8.1f} img/s")
    print(f"cv2.imdecode + resize (1 process)   {single:8.1f} img/s")
    print(f"decode limit ({n_cores} cores x 1 process)   {limit:8.1f} img/s")
    print(f"ours, decode+write phase            {ours_phase:8.1f} img/s")
    print(f"ours, end to end (incl. MLflow)     {ours_total:8.1f} img/s")
    print(f"ratio ours/naive        {ours_total / naive:5.2f}x (phase {ours_phase / naive:5.2f}x)   target >= 3.0x")
    print(f"ratio ours/decode limit {ours_total / limit:5.2f}  (phase {ours_phase / limit:5.2f})    target >= 0.8")
    print(
        f"decode, one thread, {min(DECODE_PHOTOS, len(paths))} JPEGs {WIDTH}x{HEIGHT} -> {SIZE}, best of {DECODE_ROUNDS}:"
    )
    for name in ("full decode", "previous", "ours"):
        print(f"  {name:<12} {decode[name]:7.3f} ms/photo")
    print(
        f"ratio full decode/ours {decode['full decode'] / decode['ours']:5.2f}x   "
        f"previous/ours {decode['previous'] / decode['ours']:5.2f}x   "
        f"mean abs pixel diff vs full decode {decode['mean abs diff']:.2f} levels"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
