"""Training input pipeline: memory flat in the dataset size, and not the bottleneck.

1. Memory: peak RSS of one training epoch streamed from an HDF5 file of N images vs one of 8N images (same
   model, same batch), each in its own process; target ratio <= 1.15. Beside it, the anchor: peak RSS of
   loading the 8N set into one float32 array, the way MLflow's flower example / the article did.
2. Throughput: training images/s of our pipeline (HDF5 stream -> carclf ResNet-50 with Scale layers, uint8 in)
   vs keras.applications.ResNet50 fed from an in-memory uint8 array, same batch, same run; target >= 0.9.
   The same again under the mixed_bfloat16 policy.
3. Augmentation: at 224 px, batch 64, the input pipeline's img/s without augmentation (what ``train`` streams
   now; target >= 3,000), with the old default (Keras preprocessing layers in tf.data, the baseline, measured
   here) and with our fused ops in tf.data; then the cost of the augmentation inside the training step as a
   share of one ResNet-50 training step on the CPU (target <= 10%).

Sizes (environment variables): CARCLF_BENCH_TRAIN_N (250 images), CARCLF_BENCH_TRAIN_MEM_SIZE (96 px),
CARCLF_BENCH_TRAIN_MEM_WIDTH (0.25, ResNet-18 width for the memory test), CARCLF_BENCH_TRAIN_SIZE (128 px,
throughput), CARCLF_BENCH_TRAIN_BATCH (16), CARCLF_BENCH_TRAIN_STEPS (5 timed steps after 2 warm-up steps),
CARCLF_BENCH_AUG_SIZE (224 px), CARCLF_BENCH_AUG_BATCH (64), CARCLF_BENCH_AUG_BATCHES (12 timed batches),
CARCLF_BENCH_AUG_STEP_BATCH (16: the ResNet-50 step whose cost the augmentation is compared with),
CARCLF_BENCH_TRAIN_SECTIONS ("1,2,3": which of the sections above to run).
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
SECTIONS = os.environ.get("CARCLF_BENCH_TRAIN_SECTIONS", "1,2,3").split(",")
AUG_SIZE = _env_int("CARCLF_BENCH_AUG_SIZE", 224)
AUG_BATCH = _env_int("CARCLF_BENCH_AUG_BATCH", 64)
AUG_BATCHES = _env_int("CARCLF_BENCH_AUG_BATCHES", 12)
AUG_STEP_BATCH = _env_int("CARCLF_BENCH_AUG_STEP_BATCH", 16)


def keras_layers_augmenter(seed: int = 0):
    """The online augmentation ``train`` ran before (Keras preprocessing layers in tf.data): the baseline."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomZoom(height_factor=(-0.2, 0.0), fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomRotation(factor=0.03, fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomColorJitter(
                value_range=(0, 255),
                brightness_factor=0.2,
                contrast_factor=0.2,
                saturation_factor=(0.3, 0.7),
                seed=seed + 3,
            ),
        ],
        name="online_augmentation",
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def write_dataset(path: pathlib.Path, count: int, size: int, seed: int = 0) -> pathlib.Path:
    """Random uint8 images written in slices (the writer never holds the whole set either)."""
    from carclf.data.hdf5_dataset import HDF5SplitWriter
    from carclf_flavor.images import PreprocessSettings

    rng = np.random.default_rng(seed)
    names = [f"class {i}" for i in range(NUM_CLASSES)]
    with HDF5SplitWriter(path, names, PreprocessSettings(image_size=size), split="train", expected_rows=count) as w:
        for start in range(0, count, 256):
            n = min(256, count - start)
            w.append(
                rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                rng.integers(0, NUM_CLASSES, n),
                [f"img{start + i}" for i in range(n)],
                np.tile([0, 0, size, size], (n, 1)),
            )
    return path


# -- child processes ---------------------------------------------------------------------------------
def child_train_epoch(path: str, width: float) -> dict:
    import keras

    from carclf.data.input_pipeline import HDF5Source, make_dataset
    from carclf_flavor.resnet import build_resnet

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
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        cwd=pathlib.Path(__file__).parents[1],
    )
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
        timed = self.times[WARMUP - 1 :]
        return BATCH * (len(timed) - 1) / (timed[-1] - timed[0])


def throughput(precision: str, h5_path: pathlib.Path) -> tuple[float, float]:
    import keras
    import tensorflow as tf

    from carclf.data.input_pipeline import HDF5Source, make_dataset
    from carclf_flavor.resnet import build_resnet

    keras.mixed_precision.set_global_policy(precision)
    try:
        steps = WARMUP + STEPS
        source = HDF5Source.open(h5_path)
        ours = build_resnet(50, NUM_CLASSES, SIZE)
        ours.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9), loss="sparse_categorical_crossentropy")
        timer = _StepTimer()
        ours.fit(
            make_dataset(source, BATCH, seed=0, epochs=None),
            steps_per_epoch=steps,
            epochs=1,
            verbose=0,
            callbacks=[timer.callback],
            shuffle=False,
        )
        ours_rate = timer.images_per_second()

        rng = np.random.default_rng(1)
        images = rng.integers(0, 256, (BATCH * steps, SIZE, SIZE, 3), dtype=np.uint8)  # in memory
        labels = rng.integers(0, NUM_CLASSES, BATCH * steps)
        dataset = (
            tf.data.Dataset.from_tensor_slices((images, labels))
            .batch(BATCH)
            .map(lambda x, y: (keras.applications.resnet.preprocess_input(tf.cast(x, tf.float32)), y))
            .prefetch(2)
        )
        reference = keras.applications.ResNet50(weights=None, input_shape=(SIZE, SIZE, 3), classes=NUM_CLASSES)
        reference.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9), loss="sparse_categorical_crossentropy")
        timer = _StepTimer()
        reference.fit(dataset, epochs=1, verbose=0, callbacks=[timer.callback], shuffle=False)
        return ours_rate, timer.images_per_second()
    finally:
        keras.mixed_precision.set_global_policy("float32")


# -- augmentation ----------------------------------------------------------------------------------------
def _pipeline_rate(dataset, batches: int) -> float:
    iterator = iter(dataset)
    for _ in range(2):  # warm-up: first window read, graph tracing
        next(iterator)
    started = time.perf_counter()
    images = sum(int(next(iterator)[0].shape[0]) for _ in range(batches))
    return images / (time.perf_counter() - started)


def augmentation_figures(h5_path: pathlib.Path) -> dict:
    import keras
    import tensorflow as tf

    from carclf.data.input_pipeline import HDF5Source, make_dataset
    from carclf.training.online_augmentation import augment_images, augment_in_train_step
    from carclf_flavor.resnet import build_resnet

    source = HDF5Source.open(h5_path)
    plain = lambda: make_dataset(source, AUG_BATCH, seed=0, epochs=None)  # noqa: E731
    keras_block = keras_layers_augmenter(0)

    def keras_augment(images, labels):  # exactly what make_dataset(augment=True) did before
        pixels = keras_block(tf.cast(images, tf.float32), training=True)
        return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8), labels

    figures = {
        "plain": _pipeline_rate(plain(), AUG_BATCHES),
        "keras_layers": _pipeline_rate(
            plain().map(keras_augment, num_parallel_calls=tf.data.AUTOTUNE), max(3, AUG_BATCHES // 4)
        ),
        "fused_in_tf_data": _pipeline_rate(
            make_dataset(source, AUG_BATCH, seed=0, epochs=None, augment=True), max(3, AUG_BATCHES // 2)
        ),
    }

    # In the training step: the augmentation of one step's batch vs one ResNet-50 training step.
    batch = tf.constant(np.random.default_rng(3).integers(0, 256, (AUG_STEP_BATCH, AUG_SIZE, AUG_SIZE, 3), np.uint8))
    augment = tf.function(lambda images, step: augment_images(images, tf.stack([tf.constant(0, tf.int64), step])))
    augment(batch, tf.constant(0, tf.int64))
    started = time.perf_counter()
    for step in range(5):
        augment(batch, tf.constant(step + 1, tf.int64)).numpy()
    figures["augment_seconds"] = (time.perf_counter() - started) / 5

    labels = np.random.default_rng(4).integers(0, NUM_CLASSES, AUG_STEP_BATCH)
    data = tf.data.Dataset.from_tensors((batch, labels)).repeat()
    step_seconds = {}
    for augmented in (False, True):
        model = build_resnet(50, NUM_CLASSES, AUG_SIZE)
        model.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9), loss="sparse_categorical_crossentropy")
        if augmented:
            augment_in_train_step(model, seed=0)
        timer = _StepTimer()
        model.fit(data, steps_per_epoch=WARMUP + 3, epochs=1, verbose=0, callbacks=[timer.callback], shuffle=False)
        timed = timer.times[WARMUP - 1 :]
        step_seconds[augmented] = (timed[-1] - timed[0]) / (len(timed) - 1)
    figures["step_seconds"], figures["augmented_step_seconds"] = step_seconds[False], step_seconds[True]
    return figures


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-train":
        print(json.dumps(child_train_epoch(sys.argv[2], float(sys.argv[3]))))
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "--child-load":
        print(json.dumps(child_load_float32(sys.argv[2])))
        return 0

    with tempfile.TemporaryDirectory(prefix="carclf-bench-train-") as tmp:
        tmp = pathlib.Path(tmp)
        if "1" in SECTIONS:
            small = write_dataset(tmp / "small.h5", N, MEM_SIZE)
            large = write_dataset(tmp / "large.h5", 8 * N, MEM_SIZE, seed=1)
            print(
                f"1) memory: one training epoch, ResNet-18 width {MEM_WIDTH}, {MEM_SIZE} px, batch {BATCH}, "
                f"online augmentation on"
            )
            r_small = _run_child("--child-train", str(small), str(MEM_WIDTH))
            r_large = _run_child("--child-train", str(large), str(MEM_WIDTH))
            anchor = _run_child("--child-load", str(large))
            ratio = r_large["peak_rss_mb"] / r_small["peak_rss_mb"]
            print(
                f"   N  = {N:6d} images ({small.stat().st_size / 2**20:7.1f} MB file): peak RSS "
                f"{r_small['peak_rss_mb']:7.1f} MB  ({r_small['images'] / r_small['seconds']:.0f} img/s)"
            )
            print(
                f"   8N = {8 * N:6d} images ({large.stat().st_size / 2**20:7.1f} MB file): peak RSS "
                f"{r_large['peak_rss_mb']:7.1f} MB  ({r_large['images'] / r_large['seconds']:.0f} img/s)"
            )
            print(f"   ratio 8N/N peak RSS: {ratio:.3f}  (target <= 1.15) {'OK' if ratio <= 1.15 else 'ABOVE TARGET'}")
            print(
                f"   growth N -> 8N: ours {r_large['peak_rss_mb'] - r_small['peak_rss_mb']:+.1f} MB; the float32 way "
                f"holds {anchor['array_mb']:.1f} MB for 8N (grows linearly: ~{anchor['array_mb'] / (8 * N) * 16185:.0f} MB "
                f"at Stanford Cars' 16,185 images of this size)"
            )
            print(
                f"   anchor: loading the 8N set as one float32 array (flower example): peak RSS "
                f"{anchor['peak_rss_mb']:7.1f} MB (array {anchor['array_mb']:.1f} MB; no TensorFlow loaded)"
            )

        if "2" in SECTIONS:
            print(f"2) throughput: training img/s, {SIZE} px, batch {BATCH}, {STEPS} timed steps")
            h5 = write_dataset(tmp / "throughput.h5", max(BATCH * 4, 64), SIZE, seed=2)
            for precision in ("float32", "mixed_bfloat16"):
                ours, reference = throughput(precision, h5)
                ratio = ours / reference
                print(
                    f"   {precision:<15} ours (HDF5 stream -> ResNet-50 + Scale) {ours:7.2f} img/s | "
                    f"keras.applications.ResNet50 (in-memory uint8) {reference:7.2f} img/s | ratio {ratio:.2f}"
                    + ("  (target >= 0.9)" if precision == "float32" else "")
                )

        if "3" in SECTIONS:
            print(
                f"3) augmentation: {AUG_SIZE} px, input pipeline batch {AUG_BATCH}; training step batch {AUG_STEP_BATCH}"
            )
            aug_h5 = write_dataset(tmp / "augment.h5", AUG_BATCH * 8, AUG_SIZE, seed=3)
            f = augmentation_figures(aug_h5)
            print(
                f"   input pipeline, no augmentation in tf.data (train now augments in the step): {f['plain']:7.0f} img/s"
                f"  (target >= 3,000) {'OK' if f['plain'] >= 3000 else 'BELOW TARGET'}"
            )
            print(
                f"   baseline, old default: Keras preprocessing layers in tf.data:              {f['keras_layers']:7.0f} img/s"
                f"  (pipeline {f['plain'] / f['keras_layers']:.1f}x faster without it)"
            )
            print(
                f"   our fused ops in tf.data instead (make_dataset(augment=True)):             "
                f"{f['fused_in_tf_data']:7.0f} img/s"
            )
            share = f["augment_seconds"] / f["step_seconds"]
            print(
                f"   augmentation in the training step: {f['augment_seconds'] * 1000:.0f} ms per batch of {AUG_STEP_BATCH} vs "
                f"ResNet-50 CPU training step {f['step_seconds']:.2f} s = {100 * share:.1f}% of a step  (target <= 10%) "
                f"{'OK' if share <= 0.10 else 'ABOVE TARGET'}"
            )
            print(
                f"   ResNet-50 step with the augmentation inside: {f['augmented_step_seconds']:.2f} s "
                f"({100 * (f['augmented_step_seconds'] / f['step_seconds'] - 1):+.1f}% vs without; noisy on shared cores)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
