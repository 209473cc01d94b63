"""Which compute precision the served model runs in: a decision made from facts, never a guess.

Public API:
- ``PRECISIONS``: the values ``save_model(..., inference_precision=...)`` accepts ("auto", "float32", "bfloat16").
- ``ENV_VAR``: ``CARCLF_INFERENCE_PRECISION``, which overrides the saved choice at serve time.
- ``read_cpu_flags(path="/proc/cpuinfo")``: the CPU feature flags (empty set where unknown).
- ``gpu_supports_bfloat16()``: True when TensorFlow sees a GPU with compute capability >= 8.0.
- ``choose_inference_precision(requested, cpu_flags=None, gpu=None, env=None) -> (precision, reason)``.

bfloat16 pays only where the hardware computes it natively: AMX-BF16 (Intel Xeon 4th gen and later) or
AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later) on CPU, or an Ampere-or-newer GPU. Elsewhere TensorFlow
emulates it through float32 conversions, which is several times SLOWER than float32, so ``auto`` never picks
it there. Only the standard library is imported here (this module ships inside every saved model).
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional

PRECISIONS = ("auto", "float32", "bfloat16")
ENV_VAR = "CARCLF_INFERENCE_PRECISION"
# CPU flags (as Linux names them in /proc/cpuinfo) that mean native bf16 matrix/dot-product instructions.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


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


def gpu_supports_bfloat16() -> Optional[str]:
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
    cpu_flags: Optional[Iterable[str]] = None,
    gpu: Optional[str] = "detect",
    env: Optional[Mapping[str, str]] = None,
) -> tuple[str, str]:
    """Resolve the precision to serve in and say why.

    ``requested`` is what the model was saved with; ``env[ENV_VAR]`` (default: ``os.environ``) overrides it.
    ``cpu_flags`` defaults to this machine's flags; ``gpu`` is the name of a bf16-capable GPU, None for none, or
    "detect" (default: ask TensorFlow, only when the choice is "auto").
    Returns ("float32" | "bfloat16", a one-line reason).
    """
    env = os.environ if env is None else env
    override = env.get(ENV_VAR, "").strip()
    if override:
        choice = validate_precision(override, what=ENV_VAR)
        source = f"{ENV_VAR}={override}"
    else:
        choice = validate_precision(requested)
        source = f"saved inference_precision={choice}"
    if choice != "auto":
        return choice, f"{source} forces it"

    flags = frozenset(read_cpu_flags() if cpu_flags is None else cpu_flags)
    native = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    if gpu == "detect":
        gpu = gpu_supports_bfloat16()
    if gpu:
        return "bfloat16", f"{source}: GPU {gpu} computes bf16 natively"
    if native:
        return "bfloat16", f"{source}: CPU has native bf16 ({', '.join(native)})"
    if not flags:
        return "float32", f"{source}: CPU flags unknown, bf16 would be emulated (slower), so float32"
    return "float32", (
        f"{source}: CPU lacks {' and '.join(NATIVE_BF16_CPU_FLAGS)}, bf16 would be emulated (slower), so float32"
    )
