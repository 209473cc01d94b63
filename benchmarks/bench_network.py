"""Network speed, one run, same inputs: our ResNet-50 against keras.applications.ResNet50.

(1) training-step throughput, float32: ours / keras.applications            target >= 0.95
(2) inference throughput, float32: fused / keras.applications >= 1.0, fused / our unfused >= 1.1
(3) mixed_bfloat16 training and inference, as a ratio to the same model in float32
(4) batch 1 / 8 / 32: stock float32, our unfused float32, fused float32, fused bfloat16
    (img/s, ratio to stock, achieved TFLOP/s); target fused bf16 >= 4x stock at batch 32.
(6) batch 1 / 8 / 32: stock float32, fused float32, fused bf16 (Keras) and the int8 network
    (OpenVINO + NNCF, as save_model builds it), img/s, ratios to stock and p50 latency at batch 1;
    targets: int8 >= 4x stock at batch 32 and >= 3x at batch 1 (p50 latency). Then what `auto` serves on this
    CPU for a model with an int8 network (carclf_flavor.precision, the reason as the server logs it) and that
    path's ratio to stock; target >= 3x at batch 32. The int8 convolutions' OpenVINO kernel names are printed
    (e.g. ``jit_avx2_I8``, ``brgconv_avx512_amx_I8``): they show which instruction set really ran.
(5) the hardware ceiling: a raw 3x3 convolution (ResNet stage shapes, batch 32) in float32 and bfloat16.
    The fused bf16 network cannot beat the CPU's raw bf16 convolution rate, so the 4x target is reachable
    only where bf16 convolutions run >= ~4x faster than float32 ones (matrix units: AMX-BF16, GPUs), not
    on AVX512-BF16 alone (~2x: twice the multiply-adds per instruction).

Sizes by environment variable: BENCH_IMAGE_SIZE (224), BENCH_TRAIN_BATCH (16), BENCH_INFER_BATCH (32),
BENCH_BATCHES ("1,8,32"), BENCH_ITERS (3 round-robin rounds, best kept, after BENCH_WARMUP=1 warm-up step),
BENCH_SECTIONS ("train,infer,mixed,latency,int8,ceiling"), BENCH_INT8_CALIBRATION (64 images; the weights are
random, so the int8 network's accuracy is not measured here: tests/test_int8.py does that on a trained one),
BENCH_LATENCY_N (30 timed batch-1 calls per variant). The CPU is shared: absolute figures vary from run to run,
the ratios (measured back to back in this process) are what to read.

The instruction set: ``ONEDNN_MAX_CPU_ISA=AVX2`` (any oneDNN ISA name) limits TensorFlow's oneDNN kernels,
OpenVINO's CPU plugin and carclf's reading of the CPU flags alike, so a VNNI/AMX machine measures what an
AVX2-only CPU gets: ``ONEDNN_MAX_CPU_ISA=AVX2 BENCH_SECTIONS=int8 BENCH_BATCHES=1,32 python -m benchmarks network``.
"""

from __future__ import annotations

import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

IMAGE_SIZE = int(os.environ.get("BENCH_IMAGE_SIZE", 224))
TRAIN_BATCH = int(os.environ.get("BENCH_TRAIN_BATCH", 16))
INFER_BATCH = int(os.environ.get("BENCH_INFER_BATCH", 32))
BATCHES = [int(b) for b in os.environ.get("BENCH_BATCHES", "1,8,32").split(",") if b.strip()]
ITERS = int(os.environ.get("BENCH_ITERS", 3))
WARMUP = int(os.environ.get("BENCH_WARMUP", 1))
SECTIONS = set(os.environ.get("BENCH_SECTIONS", "train,infer,mixed,latency,int8,ceiling").split(","))
INT8_CALIBRATION = int(os.environ.get("BENCH_INT8_CALIBRATION", 64))
LATENCY_N = int(os.environ.get("BENCH_LATENCY_N", 30))
NUM_CLASSES = 1000
# ResNet-50 forward pass at 224 px: ~4.1 GMAC = ~8.2 GFLOP per image; scales with the pixel count.
FORWARD_GFLOP = 8.2 * (IMAGE_SIZE / 224) ** 2
TRAIN_GFLOP = 3 * FORWARD_GFLOP  # forward + backward (~2x forward)


def cpu_summary() -> str:
    from carclf_flavor.precision import ISA_LIMIT_ENV_VARS, cpu_isa_limit, read_cpu_flags

    flags = set(read_cpu_flags())  # less what an ISA limit forbids
    model = "?"
    generation = {}  # "cpu family" / "model": a VM's model name ("AMD EPYC") hides the generation
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                key = line.split(":", 1)[0].strip()
                if key in ("cpu family", "model") and key not in generation:
                    generation[key] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    if generation:
        model += f" (family {generation.get('cpu family', '?')}, model {generation.get('model', '?')})"
    wanted = [
        f
        for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni", "amx_int8")
        if f in flags
    ]
    limit = cpu_isa_limit()
    limited = ""
    if limit:
        source = next(name for name in ISA_LIMIT_ENV_VARS if os.environ.get(name, "").strip())
        limited = f" (limited to {limit} by {source})"
    shown = " ".join(wanted) or "none of avx512f/bf16/vnni/amx"
    return f"{model}, {os.cpu_count()} cores, flags{limited}: {'avx2 ' if 'avx2' in flags else ''}{shown}"


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def compare(steps: dict, batch: int, calls_per_sample: int = 1) -> dict:
    """Images per second of each ``steps[name]()`` (each must block until its result is ready).

    The variants are timed round-robin, ITERS rounds, and each keeps its BEST round: on a CPU shared with
    other processes this puts all variants under the same background load and discards disturbed rounds,
    so the ratios compare the programs, not the neighbours.
    """
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    best = {name: float("inf") for name in steps}
    for _ in range(ITERS):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls_per_sample):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / calls_per_sample)
    return {name: batch / seconds for name, seconds in best.items()}


def inference_step(model, inputs, batch: int):
    import tensorflow as tf

    function = tf.function(lambda x: model(x, training=False))
    tensor = tf.constant(inputs[:batch])
    return lambda: function(tensor).numpy()


def inference_rates(variants: dict, batch: int) -> dict:
    """``variants``: name -> (model, inputs). Small batches repeat calls so a sample covers >= 16 images."""
    steps = {name: inference_step(model, inputs, batch) for name, (model, inputs) in variants.items()}
    return compare(steps, batch, calls_per_sample=max(1, math.ceil(16 / batch)))


def p50_latencies_ms(steps: dict, n: int) -> dict:
    """Median wall time of one call of each step (batch 1), the variants taking turns call by call."""
    for step in steps.values():
        for _ in range(3):
            step()
    times = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(values)) for name, values in times.items()}


def int8_network(fused_model, images):
    """The int8 network exactly as save_model builds it (carclf_flavor.int8_build) and load_model runs it
    (carclf_flavor.int8_runtime)."""
    from carclf_flavor import int8_build, int8_runtime

    start = time.perf_counter()
    quantized, _ = int8_build.quantize_to_int8(int8_build.convert_to_openvino(fused_model), images[:INT8_CALIBRATION])
    seconds = time.perf_counter() - start
    threads = int8_runtime.cpu_threads_for_inference()
    network = int8_runtime.OpenVINONetwork(int8_runtime.compile_network(quantized, threads), threads)
    compiled = network.compiled
    settings = ", ".join(
        f"{key}={compiled.get_property(key)}"
        for key in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS")
    )
    return network, seconds, settings


def convolution_kernels(compiled) -> str:
    """The OpenVINO kernels the compiled network's convolutions run, with counts ("jit_avx2_I8 x53")."""
    counts = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) == "Convolution":
            kernel = info["primitiveType"].astype(str)
            counts[kernel] = counts.get(kernel, 0) + 1
    return ", ".join(f"{kernel} x{count}" for kernel, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def training_step(model, inputs, labels):
    import keras

    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss="sparse_categorical_crossentropy")
    return lambda: model.train_on_batch(inputs, labels)


# (batch, height/width, channels in = out) of 3x3 convolutions in ResNet-50's stages 2-4 at 224 px.
CEILING_SHAPES = ((32, 56, 64), (32, 28, 128), (32, 14, 256))


def raw_conv_tflops(dtype: str) -> float:
    """Best TFLOP/s of a bare 3x3 convolution + ReLU over CEILING_SHAPES (the CPU's attainable rate)."""
    import tensorflow as tf

    best = 0.0
    for batch, size, channels in CEILING_SHAPES:
        flop = 2 * batch * size * size * channels * channels * 9
        x = tf.cast(tf.random.normal((batch, size, size, channels)), dtype)
        kernel = tf.cast(tf.random.normal((3, 3, channels, channels)), dtype)
        conv = tf.function(lambda a, k: tf.nn.relu(tf.nn.conv2d(a, k, 1, "SAME")))
        rate = compare({"conv": lambda conv=conv, x=x, kernel=kernel: conv(x, kernel).numpy()}, batch)["conv"]
        best = max(best, rate / batch * flop / 1e12)
    return best


# The section (6) row that runs the network `auto` serves in each precision.
AUTO_ROWS = {"int8": "ours int8 (OpenVINO)", "bfloat16": "ours fused bf16", "float32": "ours fused f32"}


def print_auto(int8_rates: dict, p50: dict) -> None:
    """What `auto` serves here for a model with an int8 network, and that row's ratios to stock float32."""
    from carclf_flavor.precision import choose_inference_precision

    precision, reason = choose_inference_precision("auto", int8_available=True)
    row = AUTO_ROWS[precision]
    print(f"  auto on this CPU serves {precision} (the '{row}' row): {reason}")
    stock = "stock keras.applications f32"
    for batch, rates in int8_rates.items():
        ratio = rates[row] / rates[stock]
        target = f"  ({verdict(ratio, 3.0)})" if batch == 32 else ""
        print(f"  batch {batch:3d}  auto ({precision}) / stock f32: {ratio:.2f}  {rates[row]:7.2f} img/s{target}")
    print(f"  batch   1  auto ({precision}) p50 {p50[row]:7.2f} ms, {p50[stock] / p50[row]:.2f}x faster than stock f32")


def verdict(value: float, target: float) -> str:
    return f"target >= {target:g}: {'MET' if value >= target else 'NOT met'}"


def main() -> None:
    import keras
    import tensorflow as tf

    from carclf_flavor.resnet import build_resnet, fuse_for_inference

    print(f"CPU: {cpu_summary()}; load average at start: {load()}")
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {IMAGE_SIZE} px, train batch {TRAIN_BATCH}, "
        f"inference batch {INFER_BATCH}, {WARMUP} warm-up + {ITERS} timed steps; "
        f"ResNet-50 forward ~{FORWARD_GFLOP:.2f} GFLOP/img"
    )
    rng = np.random.default_rng(0)
    biggest = max([INFER_BATCH, TRAIN_BATCH] + BATCHES)
    images = rng.integers(0, 256, (biggest, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    caffe = keras.applications.resnet.preprocess_input(images.astype("float32"))  # stock model's input
    labels = rng.integers(0, NUM_CLASSES, TRAIN_BATCH)

    def stock():
        return keras.applications.ResNet50(weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), classes=NUM_CLASSES)

    def ours():
        return build_resnet(50, NUM_CLASSES, IMAGE_SIZE)

    results = {}
    if "train" in SECTIONS:
        print("\n(1) training step, float32")
        rates = compare(
            {
                "keras.applications": training_step(stock(), caffe[:TRAIN_BATCH], labels),
                "ours": training_step(ours(), images[:TRAIN_BATCH], labels),
            },
            TRAIN_BATCH,
        )
        for name, rate in rates.items():
            results[("train", "float32", name)] = rate
            print(f"  {name:20s} {rate:7.2f} img/s  {rate * TRAIN_GFLOP / 1000:.3f} TFLOP/s")
        ratio = rates["ours"] / rates["keras.applications"]
        print(f"  ratio ours / keras.applications: {ratio:.2f}  ({verdict(ratio, 0.95)})")

    stock_model = ours_model = fused32 = fused16 = None
    if SECTIONS & {"infer", "latency"}:
        stock_model, ours_model = stock(), ours()
        fused32 = fuse_for_inference(ours_model, "float32")
        fused16 = fuse_for_inference(ours_model, "bfloat16")
    variants = {
        "stock keras.applications f32": (stock_model, caffe),
        "ours unfused f32": (ours_model, images),
        "ours fused f32": (fused32, images),
        "ours fused bf16": (fused16, images),
    }
    by_batch = {}
    if "infer" in SECTIONS:
        print(f"\n(2) inference, float32, batch {INFER_BATCH}")
        by_batch[INFER_BATCH] = rates = inference_rates(variants, INFER_BATCH)
        for name in list(variants)[:3]:
            results[("infer", "float32", name)] = rates[name]
            print(f"  {name:30s} {rates[name]:7.2f} img/s  {rates[name] * FORWARD_GFLOP / 1000:.3f} TFLOP/s")
        fused = rates["ours fused f32"]
        vs_stock = fused / rates["stock keras.applications f32"]
        vs_unfused = fused / rates["ours unfused f32"]
        print(f"  fused / keras.applications: {vs_stock:.2f}  ({verdict(vs_stock, 1.0)})")
        print(f"  fused / ours unfused:       {vs_unfused:.2f}  ({verdict(vs_unfused, 1.1)})")

    if "mixed" in SECTIONS:
        print("\n(3) mixed_bfloat16 (global Keras policy) vs the same model in float32, timed side by side")
        built32 = {"keras.applications": (stock, caffe), "ours": (ours, images)}
        for name, (build, inputs) in built32.items():
            model32 = build()
            keras.config.set_dtype_policy("mixed_bfloat16")
            try:
                model16 = build()
            finally:
                keras.config.set_dtype_policy("float32")
            if "infer" in SECTIONS:
                rates = inference_rates(
                    {"float32": (model32, inputs), "mixed_bfloat16": (model16, inputs)}, INFER_BATCH
                )
                print(
                    f"  inference {name:20s} f32 {rates['float32']:6.2f}  mixed_bf16 {rates['mixed_bfloat16']:6.2f}"
                    f" img/s  x{rates['mixed_bfloat16'] / rates['float32']:.2f}"
                )
            if "train" in SECTIONS:
                rates = compare(
                    {
                        "float32": training_step(model32, inputs[:TRAIN_BATCH], labels),
                        "mixed_bfloat16": training_step(model16, inputs[:TRAIN_BATCH], labels),
                    },
                    TRAIN_BATCH,
                )
                print(
                    f"  training  {name:20s} f32 {rates['float32']:6.2f}  mixed_bf16 {rates['mixed_bfloat16']:6.2f}"
                    f" img/s  x{rates['mixed_bfloat16'] / rates['float32']:.2f}"
                )

    if "latency" in SECTIONS:
        print("\n(4) inference by batch size (img/s, ratio to stock float32, achieved TFLOP/s)")
        for batch in BATCHES:
            # batch 32 reuses section (2)
            by_batch[batch] = rates = by_batch.get(batch) or inference_rates(variants, batch)
            stock_rate = rates["stock keras.applications f32"]
            for name in variants:
                print(
                    f"  batch {batch:3d}  {name:30s} {rates[name]:7.2f} img/s  x{rates[name] / stock_rate:5.2f}  "
                    f"{rates[name] * FORWARD_GFLOP / 1000:.3f} TFLOP/s"
                )
            if batch == 32:
                ratio = rates["ours fused bf16"] / stock_rate
                print(f"  fused bf16 / stock f32 at batch 32: {ratio:.2f}  ({verdict(ratio, 4.0)})")
    if "int8" in SECTIONS:
        import openvino

        stock_model = stock_model or stock()
        fused32 = fused32 or fuse_for_inference(ours(), "float32")
        fused16 = fused16 or fuse_for_inference(fused32, "bfloat16")
        network, seconds, settings = int8_network(fused32, images)
        print(
            f"\n(6) int8 (OpenVINO {openvino.get_version()}, NNCF post-training on {INT8_CALIBRATION} "
            f"images: {seconds:.0f} s; {settings}) vs Keras float32/bf16"
        )
        keras_variants = {
            "stock keras.applications f32": (stock_model, caffe),
            "ours fused f32": (fused32, images),
            "ours fused bf16": (fused16, images),
        }
        from carclf_flavor.precision import NATIVE_BF16_CPU_FLAGS, cpu_isa_limit, read_cpu_flags

        if cpu_isa_limit() and not set(NATIVE_BF16_CPU_FLAGS) & read_cpu_flags():
            # TensorFlow picks its bf16 kernels from the real CPU, then oneDNN refuses them under the limit.
            del keras_variants["ours fused bf16"]
            print(f"  (no bf16 row: TensorFlow's bf16 kernels fail under the ISA limit {cpu_isa_limit()})")
        names = list(keras_variants) + ["ours int8 (OpenVINO)"]
        int8_rates = {}
        for batch in BATCHES:
            steps = {name: inference_step(model, inputs, batch) for name, (model, inputs) in keras_variants.items()}
            batch_images = np.ascontiguousarray(images[:batch])
            steps["ours int8 (OpenVINO)"] = lambda batch_images=batch_images: network(batch_images)
            int8_rates[batch] = rates = compare(steps, batch, calls_per_sample=max(1, math.ceil(16 / batch)))
            for name in names:
                print(
                    f"  batch {batch:3d}  {name:30s} {rates[name]:7.2f} img/s  "
                    f"x{rates[name] / rates['stock keras.applications f32']:5.2f}"
                )
        if 32 in int8_rates:
            ratio = int8_rates[32]["ours int8 (OpenVINO)"] / int8_rates[32]["stock keras.applications f32"]
            print(f"  int8 / stock f32 at batch 32: {ratio:.2f}  ({verdict(ratio, 4.0)})")
        print(f"  int8 convolution kernels: {convolution_kernels(network.compiled)}")
        steps = {name: inference_step(model, inputs, 1) for name, (model, inputs) in keras_variants.items()}
        one = np.ascontiguousarray(images[:1])
        steps["ours int8 (OpenVINO)"] = lambda: network(one)
        p50 = p50_latencies_ms(steps, LATENCY_N)
        for name in names:
            print(
                f"  batch   1  {name:30s} p50 {p50[name]:7.2f} ms  "
                f"speed-up x{p50['stock keras.applications f32'] / p50[name]:5.2f}"
            )
        ratio = p50["stock keras.applications f32"] / p50["ours int8 (OpenVINO)"]
        print(f"  int8 vs stock f32, batch-1 p50 latency: {ratio:.2f}x faster  ({verdict(ratio, 3.0)})")
        print_auto(int8_rates, p50)

    if "ceiling" in SECTIONS:
        print("\n(5) hardware ceiling: raw 3x3 convolution + ReLU, batch 32, best of ResNet stage shapes")
        raw = {dtype: raw_conv_tflops(dtype) for dtype in ("float32", "bfloat16")}
        print(
            f"  raw conv float32 {raw['float32']:.3f} TFLOP/s  bfloat16 {raw['bfloat16']:.3f} TFLOP/s  "
            f"bf16 / f32 x{raw['bfloat16'] / raw['float32']:.2f}"
        )
        rates = by_batch.get(32)
        if rates:
            stock_tflops = rates["stock keras.applications f32"] * FORWARD_GFLOP / 1000
            fused_tflops = rates["ours fused bf16"] * FORWARD_GFLOP / 1000
            print(
                f"  fused bf16 network runs at {fused_tflops / raw['bfloat16']:.2f} of the raw bf16 conv rate; "
                f"ceiling for fused bf16 / stock f32 on this CPU: ~{raw['bfloat16'] / stock_tflops:.2f}x"
            )
    print(f"\nload average at end: {load()} (other processes share these cores: absolute figures are depressed)")


if __name__ == "__main__":
    main()
