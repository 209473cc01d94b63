"""Atomic file writes: every output is written under a partial name and renamed onto its final name when complete.

A reader never sees a half-written file; a run killed half-way leaves only ``.<name>.partial-<pid>``, which the
next run into the same folder removes (``remove_stale_partials``). This is the one home of that policy for the
whole pipeline (HDF5 splits, checkpoints, reports, deployment files, score outputs).

Files built with random writes (HDF5, Keras weights) cannot be built on mounts that only take sequential writes:
Databricks' Unity Catalog Volumes (``/Volumes/...``) and DBFS (``/dbfs/...``), and FUSE mounts of object stores
(blobfuse2, s3fs, gcsfuse). ``StagedFile`` builds those on local disk (``$CARCLF_STAGING_DIR``, default the temp
folder) and copies the finished file into the partial name in one sequential pass, then renames it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator


def partial_path(path: os.PathLike | str) -> pathlib.Path:
    """Where a file is written before it is complete (renamed onto ``path`` at the end)."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


# ``.<name>.partial-<pid>`` (partial_path) and ``.<name>.shards-<pid>-<id>`` (augment's shard folder).
_LEFTOVER = re.compile(r"^\..+\.(?:partial|shards)-(\d+)(?:-[0-9a-f]+)?$")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_started_at(pid: int) -> float | None:
    """Start time (epoch seconds) of a live process, None when there is none with that pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, owned by someone else
        pass
    try:
        start_ticks = int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + start_ticks / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return 0.0  # alive, start unknown: treat as the writer


def remove_stale_partials(folder: os.PathLike | str, logger: logging.Logger | None = None) -> list[pathlib.Path]:
    """Remove the partial files (and augment shard folders) in ``folder`` whose writer process is gone.

    A run killed with SIGKILL cannot clean up after itself; the next run into the same folder does. A file
    whose pid belongs to a live process is kept, unless that process started after the file was last written
    (the pid was reused by an unrelated process). The pid is checked on this machine only: one folder written
    from two machines at once (shared storage) is not supported. Says what it removed in one log line.
    """
    folder = pathlib.Path(folder)
    removed, freed = [], 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            continue
        try:
            stat = entry.lstat()
        except OSError:
            continue
        started = _process_started_at(pid)
        if started is not None and started <= stat.st_mtime + 1.0:
            continue  # its writer is still running
        size = stat.st_size if not entry.is_dir() else sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
        freed += size
    if removed:
        (logger or logging.getLogger(__name__)).warning(
            "removed %d partial file(s) left in %s by runs that were killed (%.1f MB): %s",
            len(removed),
            folder,
            freed / 2**20,
            ", ".join(sorted(p.name for p in removed)),
        )
    return removed


@contextlib.contextmanager
def atomic_output(path: os.PathLike | str) -> Iterator[pathlib.Path]:
    """Yield the partial path to write ``path`` under (a file or a folder); renamed onto ``path`` when the block
    ends normally, removed when it raises. An existing folder at ``path`` is replaced."""
    path = pathlib.Path(path)
    partial = partial_path(path)
    _remove(partial)
    try:
        yield partial
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(partial, path)
    except BaseException:
        _remove(partial)
        raise


def write_bytes_atomic(path: os.PathLike | str, data: bytes) -> pathlib.Path:
    with atomic_output(path) as partial:
        partial.write_bytes(data)
    return pathlib.Path(path)


def write_text_atomic(path: os.PathLike | str, text: str) -> pathlib.Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: os.PathLike | str, data, **dump_options) -> pathlib.Path:
    dump_options.setdefault("indent", 2)
    dump_options.setdefault("sort_keys", True)
    return write_text_atomic(path, json.dumps(data, **dump_options))


STAGING_ENV = "CARCLF_LOCAL_STAGING"  # auto (default): by mount; always; never
STAGING_DIR_ENV = "CARCLF_STAGING_DIR"
SEQUENTIAL_ONLY_ROOTS = ("/Volumes", "/dbfs")
_COPY_CHUNK = 8 * 2**20


def _mount_fstype(path: str) -> str:
    """File system type of the mount holding ``path`` (longest mount point that contains it), "" if unknown."""
    try:
        lines = pathlib.Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    best, fstype = "", ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


def refuses_random_writes(folder: os.PathLike | str) -> bool:
    """Whether files built with random writes must be staged on local disk before landing in ``folder``.

    Unity Catalog Volumes and DBFS paths, and FUSE mounts with a subtype (``fuse.blobfuse2``, ``fuse.s3fs``, ...;
    ``fuseblk`` disks take random writes); ``CARCLF_LOCAL_STAGING=always|never`` decides instead."""
    mode = os.environ.get(STAGING_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"{STAGING_ENV} must be auto, always or never, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    resolved = os.path.realpath(folder)
    if any(resolved == root or resolved.startswith(root + "/") for root in SEQUENTIAL_ONLY_ROOTS):
        return True
    return _mount_fstype(resolved).startswith("fuse.")


def staging_folder() -> pathlib.Path:
    folder = pathlib.Path(os.environ.get(STAGING_DIR_ENV) or pathlib.Path(tempfile.gettempdir()) / "carclf-staging")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def copy_sequentially(source: pathlib.Path, target: pathlib.Path) -> None:
    """Copy a file (or a folder of files) front to back in large writes, synced: what a sequential-only mount
    accepts (``shutil.copyfile`` may use ``copy_file_range``, which such mounts can refuse)."""
    if source.is_dir():
        target.mkdir()
        for entry in sorted(source.iterdir()):
            copy_sequentially(entry, target / entry.name)
        return
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_COPY_CHUNK):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())


class StagedFile:
    """Where a file (or folder) that needs random writes is built before it appears at ``path``.

    ``work_path``: the partial name beside ``path``, or a local staging file when ``path``'s folder refuses
    random writes (``refuses_random_writes``). ``publish()`` moves the finished work into place (one sequential
    copy first when staged); ``discard()`` removes it."""

    def __init__(self, path: os.PathLike | str):
        self.path = pathlib.Path(path)
        self.partial = partial_path(self.path)
        self.staged: pathlib.Path | None = None
        if refuses_random_writes(self.path.parent):
            folder = staging_folder()
            remove_stale_partials(folder)
            self.staged = folder / f".{self.path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.work_path = self.staged or self.partial

    def publish(self) -> pathlib.Path:
        try:
            if self.staged is not None:
                _remove(self.partial)
                copy_sequentially(self.staged, self.partial)
            if self.path.is_dir() and not self.path.is_symlink():
                shutil.rmtree(self.path)
            os.replace(self.partial, self.path)
        except BaseException:
            _remove(self.partial)
            raise
        finally:
            if self.staged is not None:
                _remove(self.staged)
        return self.path

    def discard(self) -> None:
        _remove(self.partial)
        if self.staged is not None:
            _remove(self.staged)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
