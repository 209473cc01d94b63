"""GPU check (`make bench-gpu`): ResNet-50 at 224 px in mixed precision on every visible GPU, bounded steps.

Three training runs, each on the visible GPUs (MirroredStrategy when there are several, as ``train``'s
``strategy=auto``), the same global batch, the same number of timed steps:
1. ours: carclf ResNet-50 + Scale, uint8 batches streamed from an HDF5 file by ``make_dataset``, the default
   online augmentation inside the training step (what ``train`` does);
2. ours fed from memory: the same model and augmentation, one uint8 batch held in memory and repeated;
3. keras.applications.ResNet50 fed from memory (float32 batch, no augmentation): the reference.
Printed: img/s of each, ours/reference, and the share of ours' step time spent waiting for input,
1 - (1) / (2) (zero when the HDF5 stream keeps up).

Without a GPU it prints that and exits 0 (``make bench`` runs it too). A budget check stops it before
8 minutes. Environment: CARCLF_BENCH_GPU_BATCH (per GPU, 128), CARCLF_BENCH_GPU_STEPS (30 timed, after 10
warm-up), CARCLF_BENCH_GPU_PRECISION (mixed_float16; mixed_bfloat16 also works), CARCLF_BENCH_GPU_IMAGES
(1024 images in the HDF5 file, read again each epoch), CARCLF_BENCH_GPU_SIZE (224), CARCLF_BENCH_GPU_WARMUP
(10), CARCLF_BENCH_GPU_DRY_RUN_ON_CPU=1 (run the code path without a GPU, tiny sizes, figures meaningless).
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

import numpy as np

BATCH_PER_GPU = int(os.environ.get("CARCLF_BENCH_GPU_BATCH", 128))
STEPS = int(os.environ.get("CARCLF_BENCH_GPU_STEPS", 30))
WARMUP = int(os.environ.get("CARCLF_BENCH_GPU_WARMUP", 10))
PRECISION = os.environ.get("CARCLF_BENCH_GPU_PRECISION", "mixed_float16")
IMAGES = int(os.environ.get("CARCLF_BENCH_GPU_IMAGES", 1024))
SIZE = int(os.environ.get("CARCLF_BENCH_GPU_SIZE", 224))
# Smoke test of this script's code path on a machine without a GPU (tiny sizes; the figures mean nothing).
DRY_RUN_ON_CPU = os.environ.get("CARCLF_BENCH_GPU_DRY_RUN_ON_CPU") == "1"
NUM_CLASSES = 196  # Stanford Cars
BUDGET_S = 7.5 * 60


def _timed_fit(model, dataset) -> float:
    """img/s over STEPS steps after WARMUP steps (per-batch timestamps from a callback)."""
    import keras

    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    model.fit(dataset, steps_per_epoch=WARMUP + STEPS, epochs=1, verbose=0, callbacks=[Timer()], shuffle=False)
    timed = times[WARMUP - 1 :]
    return GLOBAL_BATCH * (len(timed) - 1) / (timed[-1] - timed[0])


def main() -> int:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not DRY_RUN_ON_CPU:
        print(
            'no GPU visible: bench_gpu needs one (install with `pip install "carclf[gpu]"` on a GPU machine); '
            "nothing measured"
        )
        return 0
    import keras

    from benchmarks.bench_train import write_dataset
    from carclf.data.input_pipeline import HDF5Source, make_dataset
    from carclf.training.distributed import make_strategy
    from carclf.training.online_augmentation import augment_in_train_step
    from carclf_flavor.resnet import build_resnet

    started = time.monotonic()
    strategy = make_strategy("auto")
    replicas = strategy.num_replicas_in_sync
    global GLOBAL_BATCH
    GLOBAL_BATCH = BATCH_PER_GPU * replicas
    names = ", ".join(tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus)
    print(
        f"GPUs: {len(gpus)} ({names}); {type(strategy).__name__}, {replicas} replica(s); {PRECISION}; {SIZE} px; "
        f"global batch {GLOBAL_BATCH}; {STEPS} timed steps after {WARMUP}"
    )
    keras.mixed_precision.set_global_policy(PRECISION)
    with tempfile.TemporaryDirectory(prefix="carclf-bench-gpu-") as tmp:
        h5 = write_dataset(pathlib.Path(tmp) / "train.h5", max(IMAGES, GLOBAL_BATCH * 2), SIZE)
        source = HDF5Source.open(h5)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (GLOBAL_BATCH, SIZE, SIZE, 3), dtype=np.uint8)
        labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
        in_memory = tf.data.Dataset.from_tensors((images, labels)).repeat()
        rates = {}
        for name in ("ours_hdf5", "ours_memory", "reference"):
            if time.monotonic() - started > BUDGET_S:
                print(f"   stopping: {BUDGET_S:.0f} s budget spent before {name}")
                break
            with strategy.scope():
                if name == "reference":
                    model = keras.applications.ResNet50(weights=None, input_shape=(SIZE, SIZE, 3), classes=NUM_CLASSES)
                else:
                    model = build_resnet(50, NUM_CLASSES, SIZE)
                model.compile(
                    optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy"
                )
            if name == "reference":
                dataset = (
                    in_memory.map(lambda x, y: (keras.applications.resnet.preprocess_input(tf.cast(x, tf.float32)), y))
                    .cache()
                    .prefetch(2)
                )
            else:
                augment_in_train_step(model, seed=0)
                dataset = (
                    make_dataset(source, GLOBAL_BATCH, seed=0, epochs=None, prefetch=4)
                    if name == "ours_hdf5"
                    else in_memory
                )
            rates[name] = _timed_fit(model, dataset)
            print(f"   {name:<12} {rates[name]:8.0f} img/s   ({time.monotonic() - started:.0f} s so far)", flush=True)
            del model
            keras.backend.clear_session()
    if len(rates) == 3:
        wait = max(0.0, 1.0 - rates["ours_hdf5"] / rates["ours_memory"])
        print(
            f"ours (HDF5 stream, augmentation in the step) {rates['ours_hdf5']:.0f} img/s | "
            f"keras.applications.ResNet50 (in memory) {rates['reference']:.0f} img/s | "
            f"ratio {rates['ours_hdf5'] / rates['reference']:.2f}"
        )
        print(
            f"share of step time waiting for input: {100 * wait:.1f}% "
            f"(ours from memory {rates['ours_memory']:.0f} img/s)"
        )
    print(f"total {time.monotonic() - started:.0f} s (budget 8 min)")
    return 0


GLOBAL_BATCH = BATCH_PER_GPU

if __name__ == "__main__":
    sys.exit(main())
