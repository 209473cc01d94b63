"""Signing a saved model folder, and checking its signature, with OpenSSF's ``model-signing`` (elliptic-curve keys).

The signature (``carclf-model.sig``, a Sigstore bundle) covers every file of the folder, the manifest
included, except ``carclf_flavor.manifest.UNCOVERED_PATHS``; it is the same signature the ``model_signing``
CLI makes and checks (``model_signing verify key --signature carclf-model.sig --public_key pub.pem DIR``).
That CLI skips git files (``.gitignore``, ``.git/``) whatever the signature says; carclf's checks do not,
because the signed manifest lists every file.

``model_signing`` is imported only here and only when a key is used: a served model never needs it.
"""

from __future__ import annotations

import os
import pathlib
import re

from carclf_flavor.layout import SIGNATURE_FILE
from carclf_flavor.manifest import UNCOVERED_PATHS, ModelVerificationError

SIGNING_KEY_ENV_VAR = "CARCLF_SIGNING_KEY"
SIGNING_KEY_PASSWORD_ENV_VAR = "CARCLF_SIGNING_KEY_PASSWORD"


def signing_key_from(signing_key=None) -> pathlib.Path | None:
    """The private key to sign with: ``signing_key``, else $CARCLF_SIGNING_KEY, else None (unsigned)."""
    chosen = signing_key if signing_key not in (None, "") else os.environ.get(SIGNING_KEY_ENV_VAR) or None
    if chosen is None:
        return None
    path = pathlib.Path(os.fspath(chosen)).expanduser()
    if not path.is_file():
        source = "signing_key" if signing_key not in (None, "") else f"${SIGNING_KEY_ENV_VAR}"
        raise ValueError(f"{source}: {path} is not a file (expected an elliptic-curve private key PEM)")
    return path


def _hashing_config():
    import model_signing

    return (
        model_signing.hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256")
        .set_ignored_paths(paths=[p.rstrip("/") for p in UNCOVERED_PATHS], ignore_git_paths=False)
    )


def sign_model(model_dir, private_key, password: str | None = None) -> pathlib.Path:
    """Sign ``model_dir`` (after its manifest is written) with an EC private key PEM; returns the signature path.

    ``password`` (else $CARCLF_SIGNING_KEY_PASSWORD) decrypts an encrypted key.
    """
    import model_signing

    password = password if password is not None else os.environ.get(SIGNING_KEY_PASSWORD_ENV_VAR)
    signature = pathlib.Path(model_dir, SIGNATURE_FILE)
    try:
        config = model_signing.signing.Config().use_elliptic_key_signer(
            private_key=private_key, password=password.encode() if password else None
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"signing key {private_key}: not a usable elliptic-curve private key PEM ({exc})") from None
    try:
        config.set_hashing_config(_hashing_config()).sign(pathlib.Path(model_dir), signature)
    except BaseException:
        signature.unlink(missing_ok=True)  # no half-written signature beside the model
        raise
    return signature


def _first_signature_difference(message: str) -> str:
    """model_signing's "Signature mismatch: [...]" (the repr of a list: its quotes may come escaped), as one
    short clause naming the first file."""
    quoted = r"\\?'(.+?)\\?'"
    if found := re.search(r"Hash mismatch for " + quoted, message):
        return f"{found.group(1)} changed"
    if found := re.search(r"(Extra|Missing) files (?:found )?in model " + quoted + r": ([^\"'\]\\]+)", message):
        return f"{found.group(3).split(', ')[0]} {'added' if found.group(1) == 'Extra' else 'missing'}"
    return message.splitlines()[0][:300]


def verify_signature(model_dir, public_key) -> None:
    """Check ``carclf-model.sig`` against ``model_dir`` with an EC public key PEM; ``ModelVerificationError``
    (one line) when the folder is unsigned, signed with another key, or differs from what was signed."""
    import model_signing

    signature = pathlib.Path(model_dir, SIGNATURE_FILE)
    if not signature.is_file():
        raise ModelVerificationError(f"not signed (no {SIGNATURE_FILE}), and a public key was given")
    public_key = pathlib.Path(os.fspath(public_key)).expanduser()
    if not public_key.is_file():
        raise ModelVerificationError(f"public key {public_key} is not a file")
    try:
        config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelVerificationError(
            f"public key {public_key}: not an elliptic-curve public key PEM ({reason})"
        ) from None
    try:
        config.verify(pathlib.Path(model_dir), signature)
    except ValueError as exc:
        text = str(exc)
        if text.startswith("Key mismatch"):
            raise ModelVerificationError(f"{SIGNATURE_FILE} was not made with the key {public_key}") from None
        if text.startswith("Signature mismatch"):
            raise ModelVerificationError(
                f"{_first_signature_difference(text)} since it was signed ({SIGNATURE_FILE})"
            ) from None
        raise ModelVerificationError(f"{SIGNATURE_FILE} cannot be checked: {text.splitlines()[0][:300]}") from None
    except Exception as exc:  # a bundle that does not parse, a signature that does not verify (InvalidSignature)
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ModelVerificationError(f"{SIGNATURE_FILE} does not verify with {public_key} ({reason})") from None
