"""The serve-time side of the int8 network: loading the OpenVINO IR a saved model ships and running it.

Public API:
- ``INT8_MODEL_FILE`` / ``INT8_REPORT_FILE``: ``data/model_int8.xml`` (+ ``.bin``, OpenVINO IR) and
  ``data/int8.json`` (what was measured and whether the network shipped) inside a saved model.
- ``read_int8_report(data_dir)``: that report, or None for a model saved without calibration data.
- ``int8_network_available(data_dir, report)``: whether the model has a usable int8 network, and why not.
- ``load_int8_network(data_dir)``: an ``OpenVINONetwork`` (callable: uint8 pixels -> float32 probabilities).
- ``compile_network(model_or_path, threads)``: an OpenVINO model compiled with these runtime settings.
- ``cpu_threads_for_inference(env=None)``: CPUs this process may use, divided among the server's workers.

The network is built, validated and written at save time by ``carclf_flavor.int8_build``; loading needs
only this module and OpenVINO (never NNCF).

Why these runtime settings: OpenVINO's CPU plugin runs bf16 on avx512_bf16 CPUs unless told otherwise, so
``INFERENCE_PRECISION_HINT`` is always ``f32`` (int8 layers stay int8; the rest means float32). The server calls
the network one request batch at a time, which is what ``PERFORMANCE_HINT=LATENCY`` optimises (one stream
using every thread); ``THROUGHPUT`` splits the cores into single-thread streams that one request cannot fill.
OpenVINO is imported only inside functions: a model
without an int8 network never needs it.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import queue
from collections.abc import Mapping

import numpy as np

# Names inside a saved model's data folder, read back from models saved by every earlier version.
INT8_MODEL_FILE = "model_int8.xml"
INT8_REPORT_FILE = "int8.json"
# Environment variables that say how many server processes share this machine's CPUs.
WORKERS_ENV_VARS = ("CARCLF_SERVER_WORKERS", "WORKER_COUNT", "WEB_CONCURRENCY")  # ours, Azure's scorer, uvicorn


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


def compile_network(model_or_path, threads: int | None = None):
    """An OpenVINO model (or IR path) compiled for this CPU with ``runtime_config``."""
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
    return OpenVINONetwork(compile_network(str(pathlib.Path(data_dir) / INT8_MODEL_FILE), threads), threads)


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
