"""Shared pieces of the deploy tests: tiny registered pyfunc models, network-free subprocesses, server cleanup."""
from __future__ import annotations

import functools
import io
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

# Serving a real carclf model takes a TensorFlow import per server start; these tests are about the
# deployment machinery, so they serve a two-line model that reports its version and the bytes it got.
MODEL_CODE = textwrap.dedent(
    """
    import mlflow
    import pandas as pd

    VERSION = {version!r}
    BROKEN = {broken!r}


    class VersionModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            if BROKEN:
                raise RuntimeError("carclf-test: this model version fails to load")

        def predict(self, context, model_input, params=None):
            return pd.DataFrame(
                {{"version": [VERSION] * len(model_input), "n_bytes": [len(v) for v in model_input["image"]]}}
            )


    mlflow.models.set_model(VersionModel())
    """
)


def register_version_model(tmp_path: pathlib.Path, name: str, version: str, broken: bool = False) -> str:
    """Log + register a model (from code) that answers its version; returns models:/name/<registry version>."""
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    code = tmp_path / f"model_{name}_{version}.py"
    code.write_text(MODEL_CODE.format(version=version, broken=broken))
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]))
    # The throwaway model has no input example and no type hints on purpose; MLflow warns about both.
    with mlflow.start_run(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(code), signature=signature,
            pip_requirements=["mlflow"], registered_model_name=name,
        )
    return f"models:/{name}/{info.registered_model_version}"


def tiny_jpeg(size: int = 32, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@functools.lru_cache(maxsize=1)
def unshare_problem() -> str | None:
    """None when `unshare -n` (a fresh network namespace: loopback down, no routes) works here."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        result = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc}"
    if result.returncode != 0:
        return f"unshare -n is not permitted here (needs root/CAP_SYS_ADMIN): {result.stderr.decode().strip()}"
    return None


def require_unshare(what: str = "the azureml plugin"):
    """Skip where `unshare -n` cannot run; FAIL in CI (env CI set), which runs as root: a skip there would
    hide that the offline Azure tests never ran."""
    problem = unshare_problem()
    if not problem:
        return
    message = f"cannot isolate {what} from the network: {problem}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: CI runs as root and must run the offline Azure tests)", pytrace=False)
    pytest.skip(message)


def offline_run(args, env=None, timeout=90, cwd=None) -> subprocess.CompletedProcess:
    """Run a command with NO network at all (its own network namespace), so a regression that reaches for
    Azure (or the 169.254.169.254 metadata address) fails instead of sending traffic."""
    require_unshare()
    return subprocess.run(
        ["unshare", "-n", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def clean_azure_env(home: pathlib.Path) -> dict:
    """This environment without any Azure credential source: no SP variables, no `az`, an empty HOME."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AZURE_", "AZUREML_", "MSI_", "IDENTITY_")) and k not in ("HTTPS_PROXY", "https_proxy")}
    env["HOME"] = str(home)
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), "/usr/bin", "/bin")
                                  if p and not (pathlib.Path(p) / "az").exists())
    return env


def kill_servers_of_store(tracking_uri: str) -> list[int]:
    """Kill every process group whose environment names this test's tracking store (our servers only)."""
    import signal

    killed = []
    needle = f"MLFLOW_TRACKING_URI={tracking_uri}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = pathlib.Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            try:
                pgid = os.getpgid(int(entry.name))
            except ProcessLookupError:
                continue
            if pgid != os.getpgid(0):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                    killed.append(pgid)
                except ProcessLookupError:
                    pass
    return killed
