"""Verify a model before loading it: download it once, check every file against its manifest and, with a public
key, its signature; what is loaded afterwards is that checked copy, not a second download.

``carclf verify`` (entry_points/cli.py), ``score --spark``, ``demo`` and the ``carclf-local`` deployment target
use this. A key comes from the caller's parameter or $CARCLF_MODEL_PUBLIC_KEY; without one, the loaders load
as they always did (nothing checked) and ``carclf verify`` checks the manifest only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from carclf_flavor.layout import MANIFEST_FILE, SIGNATURE_FILE
from carclf_flavor.manifest import ModelVerificationError, check_manifest
from carclf_flavor.signing import verify_signature

PUBLIC_KEY_ENV_VAR = "CARCLF_MODEL_PUBLIC_KEY"

__all__ = [
    "PUBLIC_KEY_ENV_VAR",
    "ModelVerificationError",
    "VerifiedModel",
    "download_verified",
    "public_key_from",
    "verified_model_uri",
]


@dataclasses.dataclass(frozen=True)
class VerifiedModel:
    path: pathlib.Path  # the checked local copy
    files: int
    public_key: pathlib.Path | None  # the key its signature was checked with; None: manifest only
    signed: bool

    def summary(self, model_uri: str) -> str:
        if self.public_key is not None:
            how = f"signature good for {self.public_key}"
        elif self.signed:
            how = f"signature NOT checked (pass --public-key or set ${PUBLIC_KEY_ENV_VAR})"
        else:
            how = "unsigned"
        return f"verified {model_uri}: {self.files} files match {MANIFEST_FILE}, {how}"


def public_key_from(public_key=None) -> pathlib.Path | None:
    """``public_key`` if given, else $CARCLF_MODEL_PUBLIC_KEY, else None; a key that is not a file is refused."""
    chosen = public_key if public_key not in (None, "") else os.environ.get(PUBLIC_KEY_ENV_VAR) or None
    if chosen is None:
        return None
    path = pathlib.Path(os.fspath(chosen)).expanduser()
    if not path.is_file():
        source = "public key" if public_key not in (None, "") else f"${PUBLIC_KEY_ENV_VAR}"
        raise ModelVerificationError(f"{source} {path} is not a file (expected an elliptic-curve public key PEM)")
    return path


def download_verified(model_uri: str, dst_path, public_key=None) -> VerifiedModel:
    """Download ``model_uri`` under ``dst_path`` and check it (manifest; signature when a key is given).

    ``ModelVerificationError``, one line starting with the URI, when a file differs, the manifest is missing,
    or the signature is missing, made with another key or does not match.
    """
    import mlflow

    key = pathlib.Path(os.fspath(public_key)).expanduser() if public_key not in (None, "") else None
    with _no_progress_bar():
        local = pathlib.Path(mlflow.artifacts.download_artifacts(artifact_uri=str(model_uri), dst_path=str(dst_path)))
    if local.is_file():
        raise ModelVerificationError(f"{model_uri}: is a single file, not a model folder")
    try:
        files = check_manifest(local)
        if key is not None:
            verify_signature(local, key)
    except ModelVerificationError as exc:
        raise ModelVerificationError(f"{model_uri}: {exc}") from None
    return VerifiedModel(local, files, key, (local / SIGNATURE_FILE).is_file())


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow's download progress bar would wrap carriage-return lines around the one line a refusal prints."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def verified_model_uri(model_uri: str, public_key=None) -> Iterator[str]:
    """The URI to load: with a key (parameter or $CARCLF_MODEL_PUBLIC_KEY), a checked local copy that lives until
    the block ends; without one, ``model_uri`` itself (nothing checked). A tampered model raises
    ``ModelVerificationError`` before anything of it is imported."""
    key = public_key_from(public_key)
    if key is None:
        yield model_uri
        return
    folder = tempfile.mkdtemp(prefix="carclf-verified-")
    try:
        yield str(download_verified(model_uri, folder, key).path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
