"""Which compute precision the served model runs in: a decision made from facts, never a guess.

Public API:
- ``PRECISIONS``: the values ``save_model(..., inference_precision=...)`` accepts ("auto", "float32", "bfloat16",
  "int8").
- ``ENV_VAR``: ``CARCLF_INFERENCE_PRECISION``, which overrides the saved choice at serve time.
- ``ISA_LIMIT_ENV_VARS``: oneDNN's ``ONEDNN_MAX_CPU_ISA`` (and its older name ``DNNL_MAX_CPU_ISA``).
- ``cpu_isa_limit(env=None)``: that limit, upper case, or None when unset or a value oneDNN ignores.
- ``read_cpu_flags(path="/proc/cpuinfo", env=None)``: the CPU feature flags (empty set where unknown), less
  those above the ISA limit.
- ``gpu_supports_bfloat16()``: True when TensorFlow sees a GPU with compute capability >= 8.0.
- ``choose_inference_precision(requested, cpu_flags=None, gpu=None, env=None, int8_available=False,
  int8_missing_reason="") -> (precision, reason)``.

int8 is chosen first wherever the saved model ships an int8 network and the CPU has AVX2: OpenVINO's CPU
plugin has int8 convolution kernels for AVX2 and for every instruction set above it. VNNI (AVX512-VNNI,
AVX-VNNI, AMX-INT8) does an int8 dot product in one instruction where AVX2 needs three, yet the AVX2 int8
kernels still move 4x the values per register of float32 and beat every float path: `make bench` measures
int8 against stock float32 and `auto` on the CPU it runs on (the README has the figures). Without AVX2
(older x86, ARM) int8 is not chosen.
bfloat16 pays only where the hardware computes it natively: AMX-BF16 (Intel Xeon 4th gen and later) or
AVX512-BF16 (Intel Cooper Lake, AMD Zen 4 and later) on CPU, or an Ampere-or-newer GPU. Elsewhere TensorFlow
emulates it through float32 conversions, which is several times SLOWER than float32, so ``auto`` never picks
it there.

The ISA limit: both OpenVINO's CPU plugin and TensorFlow's oneDNN kernels honour ``ONEDNN_MAX_CPU_ISA`` (their
kernel names, e.g. ``jit_avx2_I8`` in place of ``brgconv_avx512_amx_I8``, show it), so the flags read here
drop what the limit forbids: ``auto`` then decides as it would on a CPU that has only those instructions.
Only the standard library is imported here (this module ships inside every saved model).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

PRECISIONS = ("auto", "float32", "bfloat16", "int8")
ENV_VAR = "CARCLF_INFERENCE_PRECISION"
# CPU flags (as Linux names them in /proc/cpuinfo) that mean native bf16 matrix/dot-product instructions.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# ... and native int8 dot products (VNNI); without them int8 runs through multi-instruction sequences.
NATIVE_INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
# The least instruction set OpenVINO's int8 kernels need (its `jit_avx2_I8` convolutions).
INT8_MIN_CPU_FLAG = "avx2"
ISA_LIMIT_ENV_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN reads the first one set
# oneDNN's ISA names, lowest first (with the older aliases of the AVX10 ones), and the CPU flags each adds.
# Flags not listed here are never removed by a limit.
_ISA_LEVELS = (
    (("SSE41",), ()),
    (("AVX",), ("avx",)),
    (("AVX2",), ("avx2", "fma")),
    (("AVX2_VNNI",), ("avx_vnni",)),
    (("AVX2_VNNI_2",), ("avx_vnni_int8", "avx_ne_convert")),
    (("AVX512_CORE",), ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")),
    (("AVX512_CORE_VNNI",), ("avx512_vnni",)),
    (("AVX512_CORE_BF16",), ("avx512_bf16",)),
    (("AVX10_1_512", "AVX512_CORE_FP16"), ("avx512_fp16",)),
    (("AVX10_1_512_AMX", "AVX512_CORE_AMX"), ("amx_tile", "amx_int8", "amx_bf16")),
    (("AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16"), ("amx_fp16",)),
)


def validate_precision(value: str, what: str = "inference_precision") -> str:
    text = str(value).strip().lower()
    if text not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return text


def cpu_isa_limit(env: Mapping[str, str] | None = None) -> str | None:
    """oneDNN's ISA limit, upper case (oneDNN reads it case-blind); None when unset, ALL/DEFAULT or unknown
    (oneDNN ignores a value it does not know, and so does carclf)."""
    env = os.environ if env is None else env
    for name in ISA_LIMIT_ENV_VARS:
        value = str(env.get(name, "")).strip().upper()
        if value:
            known = any(value in names for names, _ in _ISA_LEVELS)
            return value if known else None
    return None


def _flags_above(limit: str) -> frozenset:
    position = next(i for i, (names, _) in enumerate(_ISA_LEVELS) if limit in names)
    return frozenset(flag for _, flags in _ISA_LEVELS[position + 1 :] for flag in flags)


def read_cpu_flags(path: str = "/proc/cpuinfo", env: Mapping[str, str] | None = None) -> frozenset:
    """The feature flags of the first CPU listed in ``path``, less those above ``cpu_isa_limit(env)``; an empty
    set where they cannot be read (macOS, Windows)."""
    flags = _read_cpuinfo_flags(path)
    limit = cpu_isa_limit(env)
    return flags - _flags_above(limit) if limit else flags


def _read_cpuinfo_flags(path: str) -> frozenset:
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

    if cpu_flags is None:
        flags = read_cpu_flags(env=env)
        limit = cpu_isa_limit(env)
        cpu = f"CPU (limited to {limit} by {_isa_limit_source(env)})" if limit else "CPU"
    else:
        flags, cpu = frozenset(cpu_flags), "CPU"
    vnni = [flag for flag in NATIVE_INT8_CPU_FLAGS if flag in flags]
    if int8_available and vnni:
        return "int8", f"{source}: {cpu} has native int8 ({', '.join(vnni)}) and the model has an int8 network"
    if int8_available and INT8_MIN_CPU_FLAG in flags:
        return "int8", (
            f"{source}: {cpu} has {INT8_MIN_CPU_FLAG} but no VNNI: OpenVINO's {INT8_MIN_CPU_FLAG} int8 kernels "
            "beat the float paths, and the model has an int8 network"
        )
    if int8_available:
        skipped = f"no int8 ({cpu} lacks {INT8_MIN_CPU_FLAG}, which OpenVINO's int8 kernels need); "
    else:
        skipped = f"no int8 ({int8_missing_reason}); "
    native = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    if gpu == "detect":
        gpu = gpu_supports_bfloat16()
    if gpu:
        return "bfloat16", f"{source}: {skipped}GPU {gpu} computes bf16 natively"
    if native:
        return "bfloat16", f"{source}: {skipped}{cpu} has native bf16 ({', '.join(native)})"
    if not flags:
        return "float32", f"{source}: {skipped}CPU flags unknown, bf16 would be emulated (slower), so float32"
    return "float32", (
        f"{source}: {skipped}{cpu} lacks {' and '.join(NATIVE_BF16_CPU_FLAGS)}, bf16 would be emulated (slower), "
        "so float32"
    )


def _isa_limit_source(env: Mapping[str, str]) -> str:
    return next(name for name in ISA_LIMIT_ENV_VARS if str(env.get(name, "")).strip())
