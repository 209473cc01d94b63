"""Training input pipeline: memory flat in the dataset size, and not the bottleneck.

1. Memory: peak RSS of one training epoch streamed from an HDF5 file of N images vs one of 8N images (same
   model, same batch), each in its own process; target ratio <= 1.15. Beside it, the anchor: peak RSS of
   loading the 8N set into one float32 array, the way MLflow's flower example / the article did.
2. Throughput: training images/s of our pipeline (HDF5 stream -> carclf ResNet-50 with Scale layers, uint8 in)
   vs keras.applications.ResNet50 fed from an in-memory uint8 array, same batch, same run; target >= 0.9.
   The same again under the mixed_bfloat16 policy.

Sizes (environment variables): CARCLF_BENCH_TRAIN_N (250 images), CARCLF_BENCH_TRAIN_MEM_SIZE (96 px),
CARCLF_BENCH_TRAIN_MEM_WIDTH (0.25, ResNet-18 width for the memory test), CARCLF_BENCH_TRAIN_SIZE (128 px,
throughput), CARCLF_BENCH_TRAIN_BATCH (16), CARCLF_BENCH_TRAIN_STEPS (5 timed steps after 2 warm-up steps).
"""
from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _env_int(name: str, default: int) -> int:
    return int(float(os.environ.get(name, default)))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


N = _env_int("CARCLF_BENCH_TRAIN_N", 250)
MEM_SIZE = _env_int("CARCLF_BENCH_TRAIN_MEM_SIZE", 96)
MEM_WIDTH = _env_float("CARCLF_BENCH_TRAIN_MEM_WIDTH", 0.25)
SIZE = _env_int("CARCLF_BENCH_TRAIN_SIZE", 128)
BATCH = _env_int("CARCLF_BENCH_TRAIN_BATCH", 16)
STEPS = _env_int("CARCLF_BENCH_TRAIN_STEPS", 5)
WARMUP = 2
NUM_CLASSES = 10


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def write_dataset(path: pathlib.Path, count: int, size: int, seed: int = 0) -> pathlib.Path:
    """Random uint8 images written in slices (the writer never holds the whole set either)."""
    from carclf_flavor.images import PreprocessSettings
    from carclf.data.hdf5_dataset import HDF5SplitWriter

    rng = np.random.default_rng(seed)
    names = [f"class {i}" for i in range(NUM_CLASSES)]
    with HDF5SplitWriter(path, names, PreprocessSettings(image_size=size), split="train", expected_rows=count) as w:
        for start in range(0, count, 256):
            n = min(256, count - start)
            w.append(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, n),
                     [f"img{start + i}" for i in range(n)], np.tile([0, 0, size, size], (n, 1)))
    return path


# -- child processes ---------------------------------------------------------------------------------
def child_train_epoch(path: str, width: float) -> dict:
    import keras

    from carclf_flavor.resnet import build_resnet
    from carclf.data.input_pipeline import HDF5Source, make_dataset

    source = HDF5Source.open(path)
    keras.utils.set_random_seed(0)
    model = build_resnet(18, NUM_CLASSES, source.image_size, width=width)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    started = time.perf_counter()
    model.fit(make_dataset(source, BATCH, seed=0, augment=True), epochs=1, verbose=0, shuffle=False)
    return {"peak_rss_mb": _peak_rss_mb(), "seconds": time.perf_counter() - started, "images": source.num_images}


def child_load_float32(path: str) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        # The flower example's way: every image in memory as float32.
        images = f["images"][()].astype(np.float32)
    return {"peak_rss_mb": _peak_rss_mb(), "array_mb": images.nbytes / 2**20}


def _run_child(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", *args], capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), cwd=pathlib.Path(__file__).parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- throughput ----------------------------------------------------------------------------------------
class _StepTimer:
    def __init__(self):
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                outer.times.append(time.perf_counter())

        self.times: list[float] = []
        self.callback = Callback()

    def images_per_second(self) -> float:
        timed = self.times[WARMUP - 1:]
        return BATCH * (len(timed) - 1) / (timed[-1] - timed[0])


def throughput(precision: str, h5_path: pathlib.Path) -> tuple[float, float]:
    import keras
    import tensorflow as tf

    from carclf_flavor.resnet import build_resnet
    from carclf.data.input_pipeline import HDF5Source, make_dataset

    keras.mixed_precision.set_global_policy(precision)
    try:
        steps = WARMUP + STEPS
        source = HDF5Source.open(h5_path)
        ours = build_resnet(50, NUM_CLASSES, SIZE)
        ours.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9), loss="sparse_categorical_crossentropy")
        timer = _StepTimer()
        ours.fit(make_dataset(source, BATCH, seed=0, epochs=None), steps_per_epoch=steps, epochs=1, verbose=0,
                 callbacks=[timer.callback], shuffle=False)
        ours_rate = timer.images_per_second()

        rng = np.random.default_rng(1)
        images = rng.integers(0, 256, (BATCH * steps, SIZE, SIZE, 3), dtype=np.uint8)  # in memory
        labels = rng.integers(0, NUM_CLASSES, BATCH * steps)
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH).map(
            lambda x, y: (keras.applications.resnet.preprocess_input(tf.cast(x, tf.float32)), y)
        ).prefetch(2)
        reference = keras.applications.ResNet50(weights=None, input_shape=(SIZE, SIZE, 3), classes=NUM_CLASSES)
        reference.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9), loss="sparse_categorical_crossentropy")
        timer = _StepTimer()
        reference.fit(dataset, epochs=1, verbose=0, callbacks=[timer.callback], shuffle=False)
        return ours_rate, timer.images_per_second()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-train":
        print(json.dumps(child_train_epoch(sys.argv[2], float(sys.argv[3]))))
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "--child-load":
        print(json.dumps(child_load_float32(sys.argv[2])))
        return 0

    with tempfile.TemporaryDirectory(prefix="carclf-bench-train-") as tmp:
        tmp = pathlib.Path(tmp)
        small = write_dataset(tmp / "small.h5", N, MEM_SIZE)
        large = write_dataset(tmp / "large.h5", 8 * N, MEM_SIZE, seed=1)
        print(f"1) memory: one training epoch, ResNet-18 width {MEM_WIDTH}, {MEM_SIZE} px, batch {BATCH}, "
              f"online augmentation on")
        r_small = _run_child("--child-train", str(small), str(MEM_WIDTH))
        r_large = _run_child("--child-train", str(large), str(MEM_WIDTH))
        anchor = _run_child("--child-load", str(large))
        ratio = r_large["peak_rss_mb"] / r_small["peak_rss_mb"]
        print(f"   N  = {N:6d} images ({small.stat().st_size / 2**20:7.1f} MB file): peak RSS "
              f"{r_small['peak_rss_mb']:7.1f} MB  ({r_small['images'] / r_small['seconds']:.0f} img/s)")
        print(f"   8N = {8 * N:6d} images ({large.stat().st_size / 2**20:7.1f} MB file): peak RSS "
              f"{r_large['peak_rss_mb']:7.1f} MB  ({r_large['images'] / r_large['seconds']:.0f} img/s)")
        print(f"   ratio 8N/N peak RSS: {ratio:.3f}  (target <= 1.15) {'OK' if ratio <= 1.15 else 'ABOVE TARGET'}")
        print(f"   growth N -> 8N: ours {r_large['peak_rss_mb'] - r_small['peak_rss_mb']:+.1f} MB; the float32 way "
              f"holds {anchor['array_mb']:.1f} MB for 8N (grows linearly: ~{anchor['array_mb'] / (8 * N) * 16185:.0f} MB "
              f"at Stanford Cars' 16,185 images of this size)")
        print(f"   anchor: loading the 8N set as one float32 array (flower example): peak RSS "
              f"{anchor['peak_rss_mb']:7.1f} MB (array {anchor['array_mb']:.1f} MB; no TensorFlow loaded)")

        print(f"2) throughput: training img/s, {SIZE} px, batch {BATCH}, {STEPS} timed steps")
        h5 = write_dataset(tmp / "throughput.h5", max(BATCH * 4, 64), SIZE, seed=2)
        for precision in ("float32", "mixed_bfloat16"):
            ours, reference = throughput(precision, h5)
            ratio = ours / reference
            print(f"   {precision:<15} ours (HDF5 stream -> ResNet-50 + Scale) {ours:7.2f} img/s | "
                  f"keras.applications.ResNet50 (in-memory uint8) {reference:7.2f} img/s | ratio {ratio:.2f}"
                  + ("  (target >= 0.9)" if precision == "float32" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
