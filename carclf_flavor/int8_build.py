"""The save-time side of the int8 network: quantized post-training with OpenVINO + NNCF when the model is saved,
validated against the float32 network, written into the model's data folder only when it passes.

Public API:
- ``MIN_TOP1_AGREEMENT`` (0.99), ``MAX_TOP1_DROP_POINTS`` (0.5): the bar an int8 network must clear to ship.
- ``check_image_set(source, what, image_size, need_labels)``: uint8 (N, S, S, 3) images [+ labels] from an
  array or an ``(images, labels)`` pair. The flavor takes arrays only: the caller reads its own data files.
- ``prepare_int8_inputs(calibration_data, validation_data, image_size)``: both sets checked (and the
  calibration set thinned), before the model folder is written.
- ``build_int8_network(keras_model, data_dir, calibration, validation)``: convert, quantize, validate, write
  the IR only when it passes; returns the report (also written to ``int8.json``).
- ``log_report_to_active_run(report)``: the outcome as metrics and tags of the active MLflow run.

Serving the written network is ``carclf_flavor.int8_runtime``'s part. OpenVINO and NNCF are imported only inside
functions: a model saved without calibration data never needs them.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
import warnings

import numpy as np

from carclf_flavor.int8_runtime import (
    INT8_MODEL_FILE,
    INT8_REPORT_FILE,
    OpenVINONetwork,
    compile_network,
    cpu_threads_for_inference,
)

MIN_TOP1_AGREEMENT = 0.99
MAX_TOP1_DROP_POINTS = 0.5
# NNCF's own default; a few hundred images cover the activation ranges, more only cost save time.
MAX_CALIBRATION_IMAGES = 300
RUNTIME = "openvino"

_logger = logging.getLogger("mlflow.carclf")


class Int8DataError(ValueError):
    """calibration_data / validation_data that cannot be used; the message names the parameter."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def check_image_set(source, what: str, image_size: int, need_labels: bool):
    """(images uint8 (N, S, S, 3), labels int64 (N,) or None) from an array or an (images, labels) pair."""
    if isinstance(source, (str, bytes, os.PathLike)):
        # The flavor ships inside every model and knows nothing of the pipeline's files: the caller reads them.
        raise Int8DataError(
            f"{what}: got the path {os.fsdecode(source)}; pass the images themselves "
            f"(uint8 (N, {image_size}, {image_size}, 3), or (images, labels))"
        )
    labels = None
    if isinstance(source, tuple) and len(source) == 2:
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
        raise Int8DataError(f"{what}: labels are needed to measure the top-1 drop: pass (images, labels)")
    return images, labels


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

    ``fast``: the global pool and the classifier only; the stem convolution is int8 too. An int8 stem is
    measurably faster than a float32 one: OpenVINO runs a float32 7x7 stem at the CPU's float32 rate, a
    share of the network's time far above its 3% of the multiply-adds. Quantizing the pool and classifier
    too gained nothing measurable.

    ``accurate``: also the stem convolution and the residual additions, tried only when ``fast`` fails
    validation: it costs speed (still above bf16). The int8 stem's input
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


def prepare_int8_inputs(calibration_data, validation_data, image_size: int):
    """(calibration images, (validation images, labels) or None), checked; a one-line error otherwise."""
    if calibration_data is None:
        raise Int8DataError("validation_data validates the int8 network: pass calibration_data too")
    calibration, _ = check_image_set(calibration_data, "calibration_data", image_size, need_labels=False)
    if len(calibration) > MAX_CALIBRATION_IMAGES:
        # Evenly spaced, not the first N: the images may be sorted by class.
        calibration = calibration[np.linspace(0, len(calibration) - 1, MAX_CALIBRATION_IMAGES).astype(int)]
    validation = None
    if validation_data is not None:
        validation = check_image_set(validation_data, "validation_data", image_size, need_labels=True)
    return calibration, validation


def build_int8_network(keras_model, data_dir, calibration: np.ndarray, validation=None) -> dict:
    """Quantize ``keras_model`` (the fused float32 network) into ``data_dir``; returns the report.

    The IR is written only when the int8 network passes validation (or when there is nothing to validate
    on, with a warning). ``int8.json`` is written in every case, with the reason. ``calibration`` and
    ``validation`` as ``prepare_int8_inputs`` returns them.
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
            int8_probs = _batched_predict(OpenVINONetwork(compile_network(int8_model, threads), threads), validation)
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
