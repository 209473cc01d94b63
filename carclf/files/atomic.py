"""Atomic file writes: every output is written under a partial name and renamed onto its final name when complete.

A reader never sees a half-written file; a run killed half-way leaves only ``.<name>.partial-<pid>``, which the
next run into the same folder removes (``remove_stale_partials``). This is the one home of that policy for the
whole pipeline (HDF5 splits, checkpoints, reports, deployment files, score outputs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import time
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


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
