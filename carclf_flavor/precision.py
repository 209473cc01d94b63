"""Which compute precision the served model runs in: a decision made from facts, never a guess.

Public API:
- ``PRECISIONS``: the values ``save_model(..., inference_precision=...)`` accepts ("auto", "float32", "bfloat16",
  "int8").
- ``ENV_VAR``: ``CARCLF_INFERENCE_PRECISION``, which overrides the saved choice at serve time.
- ``read_cpu_flags(path="/proc/cpuinfo")``: the CPU feature flags (empty set where unknown).
- ``gpu_supports_bfloat16()``: True when TensorFlow sees a GPU with compute capability >= 8.0.
- ``choose_inference_precision(requested, cpu_flags=None, gpu=None, env=None, int8_available=False,
  int8_missing_reason="") -> (precision, reason)``.

int8 pays where the CPU has VNNI dot products (AVX512-VNNI: Intel Cascade Lake and later, AMD Zen 4 and later;
AVX-VNNI: Intel Alder Lake and later; AMX-INT8: Sapphire Rapids and later): 4x the multiply-accumulates of
float32 per instruction. ``auto`` picks it there when the saved model ships an int8 network, then bf16.
bfloat16 pays only where the hardware computes it natively: AMX-BF16 (Intel Xeon 4th gen and later) or
AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later) on CPU, or an Ampere-or-newer GPU. Elsewhere TensorFlow
emulates it through float32 conversions, which is several times SLOWER than float32, so ``auto`` never picks
it there. Only the standard library is imported here (this module ships inside every saved model).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

PRECISIONS = ("auto", "float32", "bfloat16", "int8")
ENV_VAR = "CARCLF_INFERENCE_PRECISION"
# CPU flags (as Linux names them in /proc/cpuinfo) that mean native bf16 matrix/dot-product instructions.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# ... and native int8 dot products (VNNI); without them int8 runs through slower multi-instruction sequences.
NATIVE_INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


def validate_precision(value: str, what: str = "inference_precision") -> str:
    text = str(value).strip().lower()
    if text not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return text


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
    """The feature flags of the first CPU listed in ``path``; an empty set where it cannot be read (macOS, Windows)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                # x86 says "flags", ARM says "Features".
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def gpu_supports_bfloat16() -> str | None:
    """Name of the first visible GPU that computes bf16 natively (compute capability >= 8.0), else None."""
    try:
        import tensorflow as tf

        for device in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(device)
            capability = details.get("compute_capability")
            if capability and tuple(capability) >= (8, 0):
                return details.get("device_name", device.name)
    except Exception:  # no TensorFlow GPU support at all: a CPU machine
        return None
    return None


def choose_inference_precision(
    requested: str,
    cpu_flags: Iterable[str] | None = None,
    gpu: str | None = "detect",
    env: Mapping[str, str] | None = None,
    int8_available: bool = False,
    int8_missing_reason: str = "the model has no int8 network",
) -> tuple[str, str]:
    """Resolve the precision to serve in and say why.

    ``requested`` is what the model was saved with; ``env[ENV_VAR]`` (default: ``os.environ``) overrides it.
    ``cpu_flags`` defaults to this machine's flags; ``gpu`` is the name of a bf16-capable GPU, None for none, or
    "detect" (default: ask TensorFlow, only when bf16 is considered). ``int8_available``: the saved model
    ships an int8 network (``int8_missing_reason`` says why not, for the reason line).
    Returns ("float32" | "bfloat16" | "int8", a one-line reason).
    """
    env = os.environ if env is None else env
    override = env.get(ENV_VAR, "").strip()
    if override:
        choice = validate_precision(override, what=ENV_VAR)
        source = f"{ENV_VAR}={override}"
    else:
        choice = validate_precision(requested)
        source = f"saved inference_precision={choice}"
    if choice == "int8":
        if int8_available:
            return "int8", f"{source} forces it"
        return "float32", f"{source}, but {int8_missing_reason}, so float32"
    if choice != "auto":
        return choice, f"{source} forces it"

    flags = frozenset(read_cpu_flags() if cpu_flags is None else cpu_flags)
    vnni = [flag for flag in NATIVE_INT8_CPU_FLAGS if flag in flags]
    if int8_available and vnni:
        return "int8", f"{source}: CPU has native int8 ({', '.join(vnni)}) and the model has an int8 network"
    if int8_available:
        skipped = f"no int8 (CPU lacks {', '.join(NATIVE_INT8_CPU_FLAGS)}); "
    else:
        skipped = f"no int8 ({int8_missing_reason}); "
    native = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    if gpu == "detect":
        gpu = gpu_supports_bfloat16()
    if gpu:
        return "bfloat16", f"{source}: {skipped}GPU {gpu} computes bf16 natively"
    if native:
        return "bfloat16", f"{source}: {skipped}CPU has native bf16 ({', '.join(native)})"
    if not flags:
        return "float32", f"{source}: {skipped}CPU flags unknown, bf16 would be emulated (slower), so float32"
    return "float32", (
        f"{source}: {skipped}CPU lacks {' and '.join(NATIVE_BF16_CPU_FLAGS)}, bf16 would be emulated (slower), "
        "so float32"
    )
