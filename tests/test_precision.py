"""Serving precision: the decision function on synthetic machines (VNNI / AVX2 / bf16 / neither), the env
override, the ISA limit, bf16 vs float32 answers."""

import logging

import numpy as np
import pandas as pd
import pytest

import carclf_flavor
from carclf_flavor.images import PreprocessSettings
from carclf_flavor.precision import ENV_VAR, choose_inference_precision, cpu_isa_limit, read_cpu_flags
from carclf_flavor.signature import top_k_entries
from helpers_flavor import CLASS_NAMES, IMAGE_SIZE, build_tiny_resnet, jpeg_bytes

ICE_LAKE = {"fpu", "sse4_2", "avx2", "avx512f", "avx512bw", "avx512_vnni"}  # AVX-512 but no bf16
SAPPHIRE_RAPIDS = ICE_LAKE | {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
ZEN4 = ICE_LAKE | {"avx512_bf16"}
GRAVITON2 = {"fp", "asimd", "aes", "sha2"}
SKYLAKE_X = {"fpu", "sse4_2", "avx2", "avx512f", "avx512bw"}  # AVX-512, neither VNNI nor bf16
ALDER_LAKE = {"fpu", "sse4_2", "avx2", "avx_vnni"}  # VNNI without AVX-512
BF16_NO_VNNI = SKYLAKE_X | {"avx512_bf16"}  # synthetic: bf16 alone
ZEN2 = {"fpu", "sse4_2", "avx", "avx2", "fma"}  # AMD EPYC Rome/Milan (Azure Das_v4/v5): AVX2 only
SANDY_BRIDGE = {"fpu", "sse4_2", "avx"}  # x86 without AVX2


@pytest.mark.parametrize(
    "flags, gpu, expected, why",
    [
        (ICE_LAKE, None, "float32", "lacks amx_bf16 and avx512_bf16"),
        (GRAVITON2, None, "float32", "lacks"),
        (set(), None, "float32", "CPU flags unknown"),
        (SAPPHIRE_RAPIDS, None, "bfloat16", "native bf16 (amx_bf16, avx512_bf16)"),
        (ZEN4, None, "bfloat16", "native bf16 (avx512_bf16)"),
        (ICE_LAKE, "NVIDIA A100-SXM4-40GB", "bfloat16", "GPU NVIDIA A100-SXM4-40GB computes bf16 natively"),
    ],
)
def test_auto_uses_bf16_only_where_the_hardware_computes_it(flags, gpu, expected, why):
    precision, reason = choose_inference_precision("auto", cpu_flags=flags, gpu=gpu, env={})
    assert precision == expected
    assert why in reason and "saved inference_precision=auto" in reason


@pytest.mark.parametrize("saved", ["float32", "bfloat16"])
def test_an_explicit_saved_choice_is_kept(saved):
    assert choose_inference_precision(saved, cpu_flags=ICE_LAKE, gpu=None, env={})[0] == saved


def test_environment_variable_overrides_the_saved_choice():
    precision, reason = choose_inference_precision(
        "auto", cpu_flags=SAPPHIRE_RAPIDS, gpu=None, env={ENV_VAR: "float32"}
    )
    assert precision == "float32" and f"{ENV_VAR}=float32" in reason
    precision, reason = choose_inference_precision("float32", cpu_flags=ICE_LAKE, gpu=None, env={ENV_VAR: "auto"})
    assert precision == "float32" and "lacks" in reason
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be one of auto, float32, bfloat16, int8, got 'fp16'"):
        choose_inference_precision("auto", cpu_flags=ICE_LAKE, gpu=None, env={ENV_VAR: "fp16"})


@pytest.mark.parametrize(
    "flags, expected, why",
    [
        (ICE_LAKE, "int8", "CPU has native int8 (avx512_vnni)"),
        (SAPPHIRE_RAPIDS, "int8", "CPU has native int8 (amx_int8, avx512_vnni)"),
        (ZEN4, "int8", "CPU has native int8 (avx512_vnni)"),
        (ALDER_LAKE, "int8", "CPU has native int8 (avx_vnni)"),
        (ZEN2, "int8", "CPU has avx2 but no VNNI: OpenVINO's avx2 int8 kernels beat the float paths"),
        (SKYLAKE_X, "int8", "CPU has avx2 but no VNNI"),
        (BF16_NO_VNNI, "int8", "CPU has avx2 but no VNNI"),
        (SANDY_BRIDGE, "float32", "no int8 (CPU lacks avx2, which OpenVINO's int8 kernels need); CPU lacks amx_bf16"),
        (GRAVITON2, "float32", "no int8 (CPU lacks avx2"),
        (set(), "float32", "CPU flags unknown"),
    ],
)
def test_auto_picks_int8_wherever_openvino_has_int8_kernels_then_bf16_then_float32(flags, expected, why):
    precision, reason = choose_inference_precision("auto", cpu_flags=flags, gpu=None, env={}, int8_available=True)
    assert precision == expected
    assert why in reason


@pytest.mark.parametrize(
    "flags, expected",
    [(SAPPHIRE_RAPIDS, "bfloat16"), (ZEN4, "bfloat16"), (ICE_LAKE, "float32"), (ZEN2, "float32")],
)
def test_auto_without_an_int8_network_behaves_as_before(flags, expected):
    precision, reason = choose_inference_precision(
        "auto", cpu_flags=flags, gpu=None, env={}, int8_missing_reason="int8 was not shipped: failed validation"
    )
    assert precision == expected and "no int8 (int8 was not shipped: failed validation)" in reason
    assert choose_inference_precision("auto", cpu_flags=flags, gpu=None, env={})[0] == expected


def test_int8_override():
    # Forced int8 means int8, VNNI or not; a model without an int8 network says so and serves float32.
    for flags in (ZEN4, SKYLAKE_X):
        precision, reason = choose_inference_precision(
            "auto", cpu_flags=flags, gpu=None, env={ENV_VAR: "int8"}, int8_available=True
        )
        assert (precision, reason) == ("int8", f"{ENV_VAR}=int8 forces it")
    precision, reason = choose_inference_precision(
        "auto", cpu_flags=ZEN4, gpu=None, env={ENV_VAR: "int8"}, int8_missing_reason="the model has no int8 network"
    )
    assert precision == "float32" and reason == f"{ENV_VAR}=int8, but the model has no int8 network, so float32"
    # ... and the other overrides win over an int8 network on a VNNI CPU.
    for forced in ("float32", "bfloat16"):
        assert (
            choose_inference_precision("auto", cpu_flags=ZEN4, gpu=None, env={ENV_VAR: forced}, int8_available=True)[0]
            == forced
        )
    assert choose_inference_precision("int8", cpu_flags=SKYLAKE_X, gpu=None, env={}, int8_available=True)[0] == "int8"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert read_cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "amx_bf16", "avx512_bf16"}
    assert read_cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_the_isa_limit_removes_the_flags_above_it(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t\t: {' '.join(sorted(SAPPHIRE_RAPIDS | ALDER_LAKE))}\n")
    limited = read_cpu_flags(str(cpuinfo), env={"ONEDNN_MAX_CPU_ISA": "avx2"})
    assert limited == {"fpu", "sse4_2", "avx2"}
    assert read_cpu_flags(str(cpuinfo), env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}) == ICE_LAKE | {"avx_vnni"}
    # The older alias of the AMX level, and oneDNN's older variable name.
    amx = read_cpu_flags(str(cpuinfo), env={"DNNL_MAX_CPU_ISA": "AVX512_CORE_AMX"})
    assert amx == SAPPHIRE_RAPIDS | ALDER_LAKE
    # Values oneDNN ignores leave the flags whole.
    for value in ("ALL", "DEFAULT", "avx9000", ""):
        assert read_cpu_flags(str(cpuinfo), env={"ONEDNN_MAX_CPU_ISA": value}) == SAPPHIRE_RAPIDS | ALDER_LAKE
        assert cpu_isa_limit({"ONEDNN_MAX_CPU_ISA": value}) is None
    assert cpu_isa_limit({"ONEDNN_MAX_CPU_ISA": " avx2 ", "DNNL_MAX_CPU_ISA": "SSE41"}) == "AVX2"


@pytest.mark.parametrize(
    "limit, expected, why",
    [
        ("AVX2", "int8", "CPU (limited to AVX2 by ONEDNN_MAX_CPU_ISA) has avx2 but no VNNI"),
        ("AVX", "float32", "no int8 (CPU (limited to AVX by ONEDNN_MAX_CPU_ISA) lacks avx2"),
    ],
)
def test_auto_under_an_isa_limit_decides_as_that_cpu_would(limit, expected, why):
    # This machine's own flags, limited: a limit at or below AVX2 leaves no VNNI and no bf16 on any x86 CPU.
    if "avx2" not in read_cpu_flags():
        pytest.skip("this CPU has no AVX2")
    env = {"ONEDNN_MAX_CPU_ISA": limit}
    precision, reason = choose_inference_precision("auto", gpu=None, env=env, int8_available=True)
    assert precision == expected and why in reason


SETTINGS = PreprocessSettings(image_size=IMAGE_SIZE, crop="none")
IMAGES = [jpeg_bytes(40 + 3 * i, 36 + 2 * i, seed=100 + i) for i in range(48)]


@pytest.fixture(scope="module")
def auto_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision") / "model"
    carclf_flavor.save_model(
        build_tiny_resnet(seed=5), path, CLASS_NAMES, preprocessing=SETTINGS, inference_precision="auto"
    )
    return path


def test_saved_auto_model_serves_in_bf16_when_forced_and_agrees_with_float32(auto_model_dir, monkeypatch, caplog):
    import mlflow.pyfunc

    monkeypatch.setenv(ENV_VAR, "float32")
    reference = carclf_flavor.load_model(str(auto_model_dir))
    assert reference.precision == "float32"
    monkeypatch.setenv(ENV_VAR, "bfloat16")
    with caplog.at_level(logging.INFO, logger="mlflow.carclf"):
        served = mlflow.pyfunc.load_model(str(auto_model_dir))
    assert f"carclf model serving in bfloat16: {ENV_VAR}=bfloat16 forces it" in caplog.text
    frame = served.predict(pd.DataFrame({"image": IMAGES}), params={"top_k": len(CLASS_NAMES)})
    expected = reference.predict(IMAGES, top_k=len(CLASS_NAMES))
    got = np.array(
        [
            [dict((e["label"], e["prob"]) for e in row)[c] for c in CLASS_NAMES]
            for row in map(top_k_entries, frame.top_k)
        ]
    )
    want = np.array([[dict((e["label"], e["prob"]) for e in r["top_k"])[c] for c in CLASS_NAMES] for r in expected])
    assert np.abs(got - want).max() <= 0.02
    # Near-ties may flip in bf16; the bar is >= 99% agreement on hundreds of images, here: all but one.
    agreement = np.mean(got.argmax(1) == want.argmax(1))
    assert agreement >= 1 - 1 / len(IMAGES)


def test_auto_on_this_machine_follows_its_cpu_flags(auto_model_dir, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    classifier = carclf_flavor.load_model(str(auto_model_dir))
    expected, _ = choose_inference_precision("auto")
    assert classifier.precision == expected
    native = {"amx_bf16", "avx512_bf16"} & set(read_cpu_flags())
    assert (classifier.precision == "bfloat16") == bool(native) or "GPU" in classifier.precision_reason


def test_model_config_overrides_the_saved_precision(auto_model_dir, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.delenv(ENV_VAR, raising=False)
    served = mlflow.pyfunc.load_model(str(auto_model_dir), model_config={"inference_precision": "float32"})
    assert served.get_raw_model().precision == "float32"
