"""The int8 inference network: quantized post-training with OpenVINO + NNCF when the model is saved, validated
against the float32 network, and run by OpenVINO's CPU plugin when the load-time choice is int8.

Public API:
- ``INT8_MODEL_FILE`` / ``INT8_REPORT_FILE``: ``data/model_int8.xml`` (+ ``.bin``, OpenVINO IR) and
  ``data/int8.json`` (what was measured and whether the network shipped) inside a saved model.
- ``MIN_TOP1_AGREEMENT`` (0.99), ``MAX_TOP1_DROP_POINTS`` (0.5): the bar an int8 network must clear to ship.
- ``read_image_set(source, what, need_labels)``: uint8 (N, S, S, 3) images [+ labels] from an array, an
  ``(images, labels)`` pair or a carclf HDF5 split.
- ``read_int8_inputs(calibration_data, validation_data, image_size)``: both sets read and checked, before the
  model folder is written.
- ``build_int8_network(keras_model, data_dir, calibration, validation)``: convert, quantize, validate, write
  the IR only when it passes; returns the report (also written to ``int8.json``).
- ``read_int8_report(data_dir)``: that report, or None for a model saved without calibration data.
- ``load_int8_network(data_dir)``: an ``OpenVINONetwork`` (callable: uint8 pixels -> float32 probabilities).
- ``cpu_threads_for_inference(env=None)``: CPUs this process may use, divided among the server's workers.

Why these runtime settings: OpenVINO's CPU plugin runs bf16 on avx512_bf16 CPUs unless told otherwise, so
``INFERENCE_PRECISION_HINT`` is always ``f32`` (int8 layers stay int8; the rest means float32). The server calls
the network one request batch at a time, which is what ``PERFORMANCE_HINT=LATENCY`` optimises (one stream
using every thread); ``THROUGHPUT`` splits the cores into single-thread streams that one request cannot fill
(measured: 229 vs 113 img/s at batch 32 on 2 cores). OpenVINO and NNCF are imported only inside functions:
a model without an int8 network never needs them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import queue
import time
import warnings
from collections.abc import Mapping

import numpy as np

INT8_MODEL_FILE = "model_int8.xml"
INT8_REPORT_FILE = "int8.json"
MIN_TOP1_AGREEMENT = 0.99
MAX_TOP1_DROP_POINTS = 0.5
# NNCF's own default; a few hundred images cover the activation ranges, more only cost save time.
MAX_CALIBRATION_IMAGES = 300
RUNTIME = "openvino"
# Environment variables that say how many server processes share this machine's CPUs.
WORKERS_ENV_VARS = ("CARCLF_SERVER_WORKERS", "WORKER_COUNT", "WEB_CONCURRENCY")  # ours, Azure's scorer, uvicorn

_logger = logging.getLogger("mlflow.carclf")


class Int8DataError(ValueError):
    """calibration_data / validation_data that cannot be used; the message names the parameter."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def read_image_set(source, what: str, image_size: int, need_labels: bool):
    """(images uint8 (N, S, S, 3), labels int64 (N,) or None) from an array, an (images, labels) pair or an HDF5 path."""
    labels = None
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if not path.is_file():
            raise Int8DataError(f"{what}: {path} is not a file (expected an HDF5 split or uint8 images)")
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                if "images" not in handle or "labels" not in handle:
                    raise Int8DataError(f"{what}: {path} has no 'images'/'labels' datasets (not a carclf split)")
                images = handle["images"][:]
                labels = handle["labels"][:]
        except OSError as exc:
            raise Int8DataError(f"{what}: cannot read {path} as HDF5 ({exc})") from None
    elif isinstance(source, tuple) and len(source) == 2:
        images, labels = source
    else:
        images = source
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (image_size, image_size, 3):
        raise Int8DataError(
            f"{what}: expected uint8 images of shape (N, {image_size}, {image_size}, 3), "
            f"got {images.dtype} {images.shape}"
        )
    if len(images) == 0:
        raise Int8DataError(f"{what}: no images")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise Int8DataError(f"{what}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    elif need_labels:
        raise Int8DataError(
            f"{what}: labels are needed to measure the top-1 drop: pass (images, labels) or an HDF5 split"
        )
    return images, labels


# --------------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------------
def _cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup v2 quota (``cpu.max``: "quota period" or "max period"), None if unlimited."""
    try:
        quota, period = pathlib.Path(root, "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return float(quota) / float(period)
    except (ValueError, ZeroDivisionError):
        return None


def _workers_from_parent_command_line() -> int | None:
    """`mlflow models serve -w N` runs `uvicorn --workers N`: each worker's parent is that process."""
    try:
        arguments = pathlib.Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any("uvicorn" in a or "gunicorn" in a for a in arguments[:3]):
        return None
    for i, argument in enumerate(arguments):
        if argument in ("--workers", "-w") and i + 1 < len(arguments) and arguments[i + 1].isdigit():
            return int(arguments[i + 1])
        if argument.startswith("--workers="):
            value = argument.split("=", 1)[1]
            return int(value) if value.isdigit() else None
    return None


def server_workers(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    for name in WORKERS_ENV_VARS:
        value = str(env.get(name, "")).strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return _workers_from_parent_command_line() or 1


def cpu_threads_for_inference(
    env: Mapping[str, str] | None = None,
    cpus: int | None = None,
    cgroup_limit: float | None = "detect",
    workers: int | None = None,
) -> int:
    """Threads for one process's network: the CPUs it may use (affinity, cgroup quota) shared among the workers."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    if cgroup_limit == "detect":
        cgroup_limit = _cgroup_cpu_limit()
    if cgroup_limit:
        cpus = min(cpus, max(1, math.ceil(cgroup_limit)))
    workers = server_workers(env) if workers is None else workers
    return max(1, cpus // max(1, workers))


def runtime_config(threads: int) -> dict:
    # No CPU pinning: each server worker would pin its threads to the same first cores of the machine
    # (OpenVINO does not know about the other workers); unpinned, the OS spreads the workers over the CPUs.
    return {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads),
        "ENABLE_CPU_PINNING": False,
    }


def _compile(model_or_path, threads: int | None = None):
    import openvino as ov

    threads = cpu_threads_for_inference() if threads is None else threads
    return ov.Core().compile_model(model_or_path, "CPU", runtime_config(threads))


class OpenVINONetwork:
    """A compiled OpenVINO network: ``network(pixels uint8 (N, S, S, 3)) -> float32 (N, C)``. Thread-safe.

    An infer request serves one call at a time; concurrent callers each take one from a pool (created on
    demand, returned after the call), so no request is shared and none is created per call.
    """

    def __init__(self, compiled, threads: int):
        self.compiled = compiled
        self.threads = int(threads)
        self._idle = queue.SimpleQueue()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            # share_inputs: the request reads the caller's array in place (no copy); infer() is synchronous.
            result = request.infer([np.ascontiguousarray(pixels, dtype=np.uint8)], share_inputs=True)
            return np.array(result[self.compiled.output(0)], dtype=np.float32)  # a copy: the request reuses its buffer
        finally:
            self._idle.put(request)


def load_int8_network(data_dir, threads: int | None = None) -> OpenVINONetwork:
    threads = cpu_threads_for_inference() if threads is None else threads
    return OpenVINONetwork(_compile(str(pathlib.Path(data_dir) / INT8_MODEL_FILE), threads), threads)


def read_int8_report(data_dir) -> dict | None:
    path = pathlib.Path(data_dir) / INT8_REPORT_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def int8_network_available(data_dir, report: dict | None) -> tuple[bool, str]:
    """(whether the saved model has a usable int8 network, why not when it has none)."""
    if report is None:
        return False, "the model was saved without calibration data (no int8 network)"
    if not report.get("shipped"):
        return False, f"int8 was not shipped: {report.get('reason', 'no reason recorded')}"
    if not (pathlib.Path(data_dir) / INT8_MODEL_FILE).is_file():
        return False, f"{INT8_MODEL_FILE} is missing from the model"
    return True, ""


# --------------------------------------------------------------------------------------------------
# Build: convert, quantize, validate
# --------------------------------------------------------------------------------------------------
def convert_to_openvino(keras_model):
    """The float32 OpenVINO model of a Keras inference network (traced through TensorFlow, no file written)."""
    import openvino as ov

    with warnings.catch_warnings():
        # Keras warns that the traced input is a tuple rather than its named structure: same tensor.
        warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
        return ov.convert_model(keras_model)


# Quantization scopes, tried in this order until one passes validation (see float32_scope).
SCOPES = ("fast", "accurate")


def float32_scope(ov_model, scope: str = "fast") -> dict:
    """The operations kept float32 in the int8 network, by role: {role: [OpenVINO operation names]}.

    ``fast``: the global pool and the classifier only; the stem convolution is int8 too. ResNet-50 at
    224 px, batch 32, on a 2-core AMD EPYC Zen 5 (family 26): 202.6 img/s with an int8 stem against 179.8
    with a float32 one (OpenVINO runs a float32 7x7 stem at the CPU's float32 rate: 12% of the network's
    time for 3% of its multiply-adds); quantizing the pool and classifier too gained nothing (203.4).

    ``accurate``: also the stem convolution and the residual additions, tried only when ``fast`` fails
    validation: it costs speed (71 vs 98 img/s on an earlier CPU, still above bf16). The int8 stem's input
    is the mean-subtracted pixels at one per-tensor step of ~1.2 grey levels: on the half-trained pipeline
    network (ResNet-18 x0.25, 32 px) the additions in float32 agreed with float32 on 100% of its 50
    validation images with a float32 stem and on 96% with an int8 one.

    Measured on small carclf ResNets trained from scratch (ResNet-18 x0.25, 32 px, 10 sample classes, 5 and
    10 epochs; top-1 agreement with float32 on 210 held-out images): with every convolution kept float32,
    the remaining 8-bit quantizers on the residual additions and the pooled features alone cost 94.3%
    agreement, as much as quantizing everything (93.3%); keeping the additions, the pool and the classifier
    float32 raised the 10-epoch model from 97.6% to 99.0% and its 50-image validation split from 96% to 100%.
    A quantized addition rounds the whole residual stream to one per-tensor 8-bit range; the convolutions,
    which carry the multiply-adds, stay int8 (weights per output channel).
    """
    ops = ov_model.get_ordered_ops()

    def computed(op) -> bool:
        return all(i.get_source_output().get_node().get_type_name() != "Constant" for i in op.inputs())

    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    kept = {
        "global average pool": [op.get_friendly_name() for op in ops if op.get_type_name() == "ReduceMean"],
        "classifier": [op.get_friendly_name() for op in ops if op.get_type_name() == "MatMul"],
    }
    if scope == "accurate":
        convolutions = [op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"]
        # The 7x7 stem sees the mean-subtracted pixels; ~3% of ResNet-50's multiply-adds.
        kept["stem convolution"] = convolutions[:1]
        kept["residual additions"] = [
            op.get_friendly_name() for op in ops if op.get_type_name() == "Add" and computed(op)
        ]
    return kept


def quantization_settings(scope: str, kept: dict, calibration_images: int) -> dict:
    """What the int8 network was built with, as recorded in the model's metadata (``int8.json``)."""
    return {
        "tool": "nncf.quantize (post-training)",
        "scope": scope,
        "preset": "performance",
        "weights": "int8 symmetric, per output channel",
        "activations": "int8 per tensor, ranges from the calibration min/max",
        "bias_correction": "full",
        "calibration_images": int(calibration_images),
        "float32_operations": {role: len(names) for role, names in kept.items()},
    }


def quantize_to_int8(ov_model, calibration_images: np.ndarray, scope: str = "fast"):
    """NNCF post-training quantization, calibrated on one image per sample; returns (int8 model, settings).

    Settings chosen by measurement on small trained carclf ResNets (top-1 agreement with float32 on
    held-out images, NNCF defaults -> these): full bias correction instead of the fast one (95.3% -> 97.7%),
    activation ranges from the global min/max instead of the mean of per-batch extremes (-> 99.0%), and the
    operations of ``float32_scope(scope)`` kept float32. Measured and not taken: the MIXED preset (asymmetric
    activations) changed nothing. A network near chance (top-1 margins below int8's rounding) can still fail:
    that is why nothing ships without ``verdict`` on held-out images.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    kept = float32_scope(ov_model, scope)
    samples = [calibration_images[i : i + 1] for i in range(len(calibration_images))]
    quantized = nncf.quantize(
        ov_model,
        nncf.Dataset(samples),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(samples),
        fast_bias_correction=False,
        ignored_scope=nncf.IgnoredScope(names=[name for names in kept.values() for name in names]),
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
        ),
    )
    return quantized, quantization_settings(scope, kept, len(samples))


def _batched_predict(predict, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([np.asarray(predict(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])


def measure_agreement(float_probs: np.ndarray, int8_probs: np.ndarray, labels: np.ndarray | None) -> dict:
    float_top1 = float_probs.argmax(1)
    int8_top1 = int8_probs.argmax(1)
    measured = {"validation_images": int(len(float_top1)), "top1_agreement": float(np.mean(float_top1 == int8_top1))}
    if labels is not None:
        measured["float32_top1"] = float(np.mean(float_top1 == labels))
        measured["int8_top1"] = float(np.mean(int8_top1 == labels))
        measured["top1_drop_points"] = 100.0 * (measured["float32_top1"] - measured["int8_top1"])
    return measured


def verdict(measured: dict) -> tuple[bool, str]:
    agreement = measured["top1_agreement"]
    drop = measured.get("top1_drop_points")
    problems = []
    if agreement < MIN_TOP1_AGREEMENT:
        problems.append(f"top-1 agreement with float32 {100 * agreement:.2f}% < {100 * MIN_TOP1_AGREEMENT:g}%")
    if drop is not None and drop > MAX_TOP1_DROP_POINTS:
        problems.append(f"top-1 drop {drop:.2f} points > {MAX_TOP1_DROP_POINTS:g}")
    where = f"on {measured['validation_images']} validation images"
    if problems:
        return False, f"int8 failed validation {where}: {'; '.join(problems)}"
    return True, (f"int8 validated {where}: top-1 agreement {100 * agreement:.2f}%, top-1 drop {drop:.2f} points")


def _write_json_atomic(path: pathlib.Path, record: dict) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(partial, path)


def read_int8_inputs(calibration_data, validation_data, image_size: int):
    """(calibration images, (validation images, labels) or None), checked; a one-line error otherwise."""
    if calibration_data is None:
        raise Int8DataError("validation_data validates the int8 network: pass calibration_data too")
    calibration, _ = read_image_set(calibration_data, "calibration_data", image_size, need_labels=False)
    if len(calibration) > MAX_CALIBRATION_IMAGES:
        # Evenly spaced, not the first N: an HDF5 split may be sorted by class.
        calibration = calibration[np.linspace(0, len(calibration) - 1, MAX_CALIBRATION_IMAGES).astype(int)]
    validation = None
    if validation_data is not None:
        validation = read_image_set(validation_data, "validation_data", image_size, need_labels=True)
    return calibration, validation


def build_int8_network(keras_model, data_dir, calibration: np.ndarray, validation=None) -> dict:
    """Quantize ``keras_model`` (the fused float32 network) into ``data_dir``; returns the report.

    The IR is written only when the int8 network passes validation (or when there is nothing to validate
    on, with a warning). ``int8.json`` is written in every case, with the reason. ``calibration`` and
    ``validation`` as ``read_int8_inputs`` returns them.
    """
    import nncf
    import openvino as ov

    data_dir = pathlib.Path(data_dir)
    validation, labels = validation if validation is not None else (None, None)

    started = time.perf_counter()
    float_model = convert_to_openvino(keras_model)
    report = {
        "runtime": RUNTIME,
        "openvino_version": ov.get_version(),
        "nncf_version": nncf.__version__,
        "calibration_images": int(len(calibration)),
        "min_top1_agreement": MIN_TOP1_AGREEMENT,
        "max_top1_drop_points": MAX_TOP1_DROP_POINTS,
        "model_file": INT8_MODEL_FILE,
    }
    if validation is None:
        int8_model, report["quantization"] = quantize_to_int8(float_model, calibration, SCOPES[0])
        shipped, reason = True, "int8 shipped NOT validated: no validation_data was given"
        warnings.warn(f"carclf: {reason}", stacklevel=3)
        report["validated"] = False
    else:
        import tensorflow as tf

        # The float32 reference is the Keras network itself, the path float32 serving runs.
        forward = tf.function(lambda x: keras_model(x, training=False))
        float_probs = _batched_predict(lambda x: forward(x).numpy(), validation)
        threads = cpu_threads_for_inference()
        attempts = []
        # The fastest scope first; the next only if it fails (two fixed candidates: little room to fit the
        # validation images by chance, unlike reverting layers one by one until they agree).
        for scope in SCOPES:
            int8_model, settings = quantize_to_int8(float_model, calibration, scope)
            int8_probs = _batched_predict(OpenVINONetwork(_compile(int8_model, threads), threads), validation)
            measured = measure_agreement(float_probs, int8_probs, labels)
            shipped, reason = verdict(measured)
            attempts.append({"scope": scope, "top1_agreement": measured["top1_agreement"], "shipped": shipped})
            if shipped:
                break
        if shipped and scope != SCOPES[0]:
            reason += (
                " with the stem convolution and the residual additions in float32"
                f" (scope {SCOPES[0]}: {100 * attempts[0]['top1_agreement']:.2f}% agreement)"
            )
        report.update(measured, quantization=settings, attempts=attempts, validated=True)
    report.update(shipped=shipped, reason=reason, seconds=round(time.perf_counter() - started, 2))
    if shipped:
        # OpenVINO writes xml + bin; compress_to_fp16=False keeps the non-quantized weights exactly float32.
        ov.save_model(int8_model, str(data_dir / INT8_MODEL_FILE), compress_to_fp16=False)
    else:
        _logger.warning("carclf: %s", reason)
    _write_json_atomic(data_dir / INT8_REPORT_FILE, report)
    return report


def log_report_to_active_run(report: dict | None) -> None:
    """Record the int8 outcome in the active MLflow run (metrics for the measurements, tags for the verdict)."""
    import mlflow

    if report is None or mlflow.active_run() is None:
        return
    metrics = {
        f"int8_{key}": float(report[key])
        for key in (
            "top1_agreement",
            "top1_drop_points",
            "float32_top1",
            "int8_top1",
            "calibration_images",
            "validation_images",
        )
        if key in report
    }
    if metrics:
        mlflow.log_metrics(metrics)
    mlflow.set_tags(
        {
            "carclf.int8_shipped": str(bool(report["shipped"])).lower(),
            "carclf.int8_validated": str(bool(report.get("validated"))).lower(),
            "carclf.int8_reason": report["reason"][:5000],
            "carclf.int8_scope": str(report.get("quantization", {}).get("scope", "")),
        }
    )
