"""The manifest of a saved model: the SHA-256 of every file in its folder, written last by ``save_model``.

``check_manifest`` refuses a folder where a file was changed, added or removed since it was saved; the
manifest itself is only as trustworthy as where it came from, which is what the signature
(``carclf_flavor.signing``) settles. Only the standard library is used here: checking a manifest needs no
extra package.

Not covered, because they cannot be or are added after ``save_model`` by MLflow itself:

- ``carclf-manifest.json`` (the manifest) and ``carclf-model.sig`` (the signature, made over the manifest and
  every covered file);
- ``registered_model_meta``: MLflow writes the registry name and version into every download of a
  ``models:/name/version`` URI; MLflow's client reads it, nothing imports it;
- ``metadata/``: on Databricks, ``log_model`` copies MLmodel, conda.yaml and the requirements there for Unity
  Catalog sharing after ``save_model`` returns; no loader reads it.

Everything else counts, ``__pycache__`` included: Python runs a ``.pyc`` in place of its source.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from carclf_flavor.layout import MANIFEST_FILE, SIGNATURE_FILE

MANIFEST_FORMAT = 1
# Paths (relative to the model folder; a trailing "/" is a folder) that neither the manifest nor the signature
# covers. The reasons are in the module docstring.
UNCOVERED_PATHS = (MANIFEST_FILE, SIGNATURE_FILE, "registered_model_meta", "metadata/")
# A manifest lists a few dozen files; a larger one is not a manifest save_model wrote.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_CHUNK = 1024 * 1024


class ModelVerificationError(ValueError):
    """A model folder that does not match its manifest or signature; the message is one line naming why."""


def _uncovered(relative: str) -> bool:
    return any(relative == p or (p.endswith("/") and relative.startswith(p)) for p in UNCOVERED_PATHS)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(model_dir) -> tuple[list[str], list[str]]:
    """(covered regular files, symlinks) under ``model_dir`` as sorted "/"-separated relative paths."""
    root = pathlib.Path(model_dir)
    files, links = [], []
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in dirs + names:
            path = pathlib.Path(folder, name)
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                links.append(relative)
            elif name in names and not _uncovered(relative):
                files.append(relative)
        dirs[:] = [d for d in dirs if not pathlib.Path(folder, d).is_symlink()]
    return sorted(files), sorted(links)


def file_digests(model_dir) -> dict[str, str]:
    """{relative path: SHA-256 hex} of every covered file of ``model_dir``; a symlink is refused (it may point
    anywhere, and save_model writes none)."""
    files, links = model_files(model_dir)
    if links:
        raise ModelVerificationError(f"{links[0]} is a symlink (a saved model holds plain files only)")
    root = pathlib.Path(model_dir)
    return {relative: _sha256(root / relative) for relative in files}


def write_manifest(model_dir) -> dict:
    """Write ``carclf-manifest.json`` over every covered file; call it after the last file is written."""
    record = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": file_digests(model_dir)}
    path = pathlib.Path(model_dir, MANIFEST_FILE)
    partial = path.with_name(f".{MANIFEST_FILE}.partial")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)  # a reader never sees half a manifest
    return record


def read_manifest(model_dir) -> dict | None:
    """The manifest's ``files`` map; None when the folder has no manifest (saved by carclf 0.3.0 or earlier)."""
    path = pathlib.Path(model_dir, MANIFEST_FILE)
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ModelVerificationError(f"{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelVerificationError(f"{MANIFEST_FILE} is not JSON ({exc})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if (
        not isinstance(record, dict)
        or record.get("format") != MANIFEST_FORMAT
        or record.get("algorithm") != "sha256"
        or not isinstance(files, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
    ):
        raise ModelVerificationError(f"{MANIFEST_FILE} is not a format-{MANIFEST_FORMAT} sha256 manifest")
    return files


def manifest_problems(model_dir, expected: dict[str, str]) -> list[str]:
    """One text per file that differs from ``expected``: "<path> changed", "<path> added", "<path> missing"."""
    actual = file_digests(model_dir)
    problems = [f"{p} changed" for p in sorted(expected.keys() & actual.keys()) if expected[p] != actual[p]]
    problems += [f"{p} added" for p in sorted(actual.keys() - expected.keys())]
    problems += [f"{p} missing" for p in sorted(expected.keys() - actual.keys())]
    return problems


def check_manifest(model_dir) -> int:
    """Check every file of ``model_dir`` against its manifest; returns the number of files checked.

    Raises ``ModelVerificationError`` (one line: the first file that differs, and how many more) when a file
    was changed, added or removed, and when there is no manifest.
    """
    expected = read_manifest(model_dir)
    if expected is None:
        raise ModelVerificationError(
            f"no manifest ({MANIFEST_FILE}): saved by carclf 0.3.0 or earlier, or not by carclf's save_model, "
            "so its files cannot be checked"
        )
    problems = manifest_problems(model_dir, expected)
    if problems:
        more = f" (and {len(problems) - 1} more: {', '.join(problems[1:4])}{', ...' if len(problems) > 4 else ''})"
        raise ModelVerificationError(
            f"{problems[0]} since it was saved{more if len(problems) > 1 else ''} ({MANIFEST_FILE})"
        )
    return len(expected)
