"""Identities of input files: cheap ones (names, sizes, modification times; no content read) and content hashes.

One home for "has this input changed?": ``main`` reuses a finished step only when its inputs' fingerprints are
unchanged, and ``train`` resumes a checkpoint only into the same data. ``file_sha256`` (content) is what the
runs record as dataset lineage.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Iterable


def file_identity(path: os.PathLike | str) -> list:
    """``[absolute path, size, mtime_ns]`` of one file (raises OSError when it is missing)."""
    path = pathlib.Path(path)
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def files_identity(paths: Iterable[os.PathLike | str]) -> list:
    """The identity of each file, in the given order."""
    return [file_identity(path) for path in paths]


def file_fingerprint(path: os.PathLike | str) -> str:
    """SHA-256 over the identity of a file or of every file of a folder tree (``<missing>`` when absent)."""
    path = pathlib.Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = child.stat()
            digest.update(f"{child.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    elif path.exists():
        stat = path.stat()
        digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    else:
        digest.update(b"<missing>")
    return digest.hexdigest()


def file_sha256(path: os.PathLike | str, chunk_size: int = 8 << 20) -> str:
    """Content hash, streamed in 8 MiB chunks (memory stays flat; ~1 s per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
