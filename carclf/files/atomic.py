"""Atomic file writes: every output is written under a partial name and renamed onto its final name when complete.

A reader never sees a half-written file; a run killed half-way leaves only ``.<name>.partial-<pid>``, which the
next run into the same folder removes (``remove_stale_partials``). This is the one home of that policy for the
whole pipeline (HDF5 splits, checkpoints, reports, deployment files, score outputs).

Files built with random writes (HDF5, Keras weights) cannot be built on mounts that only take sequential writes:
Databricks' Unity Catalog Volumes (``/Volumes/...``) and DBFS (``/dbfs/...``), and FUSE mounts of object stores
(blobfuse2, s3fs, gcsfuse). ``StagedFile`` builds those on local disk (``$CARCLF_STAGING_DIR``, default the temp
folder) and copies the finished file into the partial name in one sequential pass, then renames it.

A step whose output is several files (preprocess's three splits and their manifest) commits them together
(``commit_output_set``): every file is complete under its partial name first, then a small journal listing the
renames is written, the renames run, and the journal is removed. A run killed during the renames leaves the
journal; the next writer into the folder (``remove_stale_partials``) and every reader (``settle_output_set``)
finish those renames first, so what is left is the earlier complete set or the new complete set, never a mix.
(One rename of a folder would need the outputs to live in a sub-folder, which would change every path a user
passes to the steps; a mount point cannot be renamed either.)

Write errors (a full disk above all) end in ``OutputWriteError``: one line naming the file, the space the
output needs and the space free. Steps check free space up front against an estimate (``check_free_space``),
so a full disk is usually refused before any work is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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


# ``.<name>.partial-<pid>`` (partial_path), ``.<name>.shards-<pid>-<id>`` (augment's shard folder) and
# ``.<name>.replaced-<pid>`` (an earlier output moved aside while its successor is renamed in).
_LEFTOVER = re.compile(r"^\..+\.(?:partial|shards|replaced)-(\d+)(?:-[0-9a-f]+)?$")
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
    settle_output_set(folder, wait_s=0.0, logger=logger)  # its partials are the new output, not leftovers
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or entry.name in _journalled(folder):
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
        replace_output(partial, path)
    except BaseException:
        _remove(partial)
        raise


_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)
_AT_FDCWD = -100


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the file system or libc
    cannot (FUSE mounts, other systems)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_output(partial: pathlib.Path, path: pathlib.Path) -> None:
    """Rename the finished ``partial`` onto ``path``. A file is replaced by one rename; a folder (Spark's
    Parquet output) is swapped with the earlier one in one step where the file system can, so that ``path``
    always holds the earlier or the new complete output, and the earlier one is removed afterwards."""
    if not (path.is_dir() and not path.is_symlink()):
        os.replace(partial, path)
        return
    if _exchange(partial, path):
        _remove(partial)  # now the earlier output
        return
    aside = path.with_name(f".{path.name}.replaced-{os.getpid()}")
    _remove(aside)
    os.replace(path, aside)
    try:
        os.replace(partial, path)
    except BaseException:
        os.replace(aside, path)
        raise
    _remove(aside)


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
        self.landed = False

    def land(self) -> pathlib.Path:
        """The finished work under its partial name beside ``path`` (copied there when staged), ready to be
        renamed, alone (``publish``) or with other files (``commit_output_set``)."""
        if self.landed:
            return self.partial
        try:
            if self.staged is not None:
                _remove(self.partial)
                copy_sequentially(self.staged, self.partial)
        except BaseException:
            _remove(self.partial)
            raise
        finally:
            if self.staged is not None:
                _remove(self.staged)
        self.landed = True
        return self.partial

    def publish(self) -> pathlib.Path:
        self.land()
        try:
            replace_output(self.partial, self.path)
        except BaseException:
            _remove(self.partial)
            raise
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


# ----------------------------------------------------------------------------------------------------------
# Output sets: several files that appear together
# ----------------------------------------------------------------------------------------------------------
_JOURNAL = re.compile(r"^\.carclf-commit-(\d+)\.json$")


def _journals(folder: pathlib.Path) -> list[tuple[pathlib.Path, int]]:
    try:
        names = [entry.name for entry in folder.iterdir()]
    except OSError:
        return []
    return [(folder / name, int(m.group(1))) for name in sorted(names) if (m := _JOURNAL.match(name))]


def _renames_of(journal: pathlib.Path) -> list[tuple[str, str]]:
    try:
        return [(str(a), str(b)) for a, b in json.loads(journal.read_text())["renames"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _journalled(folder: pathlib.Path) -> set[str]:
    return {partial for journal, _ in _journals(folder) for partial, _ in _renames_of(journal)}


def _fsync_folder(folder: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _run_renames(folder: pathlib.Path, renames: list[tuple[str, str]]) -> None:
    for partial, final in renames:
        if (folder / partial).exists():
            replace_output(folder / partial, folder / final)
    _fsync_folder(folder)


def commit_output_set(landed: dict[os.PathLike | str, os.PathLike | str]) -> list[pathlib.Path]:
    """Rename finished partial files (``{partial: final}``, all in one folder) onto their final names as one
    set: either all of them appear or, while the journal is in place, readers wait for (or finish) the renames.
    Removes the partials if it fails before the journal is written."""
    pairs = [(pathlib.Path(partial), pathlib.Path(final)) for partial, final in landed.items()]
    folder = pairs[0][1].parent
    if any(p.parent != folder or f.parent != folder for p, f in pairs):
        raise ValueError(f"an output set lives in one folder: {[str(f) for _, f in pairs]}")
    renames = [(p.name, f.name) for p, f in pairs]
    journal = folder / f".carclf-commit-{os.getpid()}.json"
    try:
        with atomic_output(journal) as partial, open(partial, "w") as handle:
            json.dump({"renames": renames}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_folder(folder)
    except OSError as exc:
        for p, _ in pairs:
            _remove(p)
        raise write_error(journal, exc) from None
    # From here on the set is committed: a failure below is finished by the next writer or reader.
    _run_renames(folder, renames)
    journal.unlink()
    _fsync_folder(folder)
    return [f for _, f in pairs]


def settle_output_set(folder: os.PathLike | str, wait_s: float = 30.0, logger: logging.Logger | None = None) -> None:
    """Make ``folder`` hold whole output sets only: renames of a commit whose process is gone are finished;
    a commit in progress (a few renames) is waited for, up to ``wait_s`` seconds."""
    folder = pathlib.Path(folder)
    deadline = time.monotonic() + wait_s
    while journals := _journals(folder):
        pending = False
        for journal, pid in journals:
            if pid != os.getpid() and _process_started_at(pid) is not None:
                pending = True
                continue
            renames = _renames_of(journal)
            _run_renames(folder, renames)
            with contextlib.suppress(FileNotFoundError):
                journal.unlink()
            (logger or logging.getLogger(__name__)).warning(
                "finished the commit of %s in %s (its run was killed while renaming them)",
                ", ".join(final for _, final in renames),
                folder,
            )
        if not pending:
            return
        if time.monotonic() >= deadline:
            if wait_s:
                raise OutputWriteError(f"{folder}: an output set is still being committed after {wait_s:.0f} s")
            return
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------------
# Space and write errors
# ----------------------------------------------------------------------------------------------------------
class OutputWriteError(OSError):
    """An output could not be written (no space, no permission, ...); the message is one line naming the file."""

    def __str__(self) -> str:
        return self.strerror or (str(self.args[0]) if self.args else "")


def free_bytes(folder: os.PathLike | str) -> int | None:
    """Bytes an unprivileged writer may still use on the file system of ``folder`` (or its nearest existing
    parent); None when unknown."""
    path = pathlib.Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _mb(size: float) -> str:
    return f"{size / 2**20:.1f} MB"


def check_free_space(folder: os.PathLike | str, needed: int, what: str) -> None:
    """Refuse in one line when ``folder``'s file system has less than ``needed`` bytes free for ``what``."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise OutputWriteError(
            errno.ENOSPC,
            f"not enough space in {folder} for {what}: needs about {_mb(needed)}, {_mb(free)} free"
            " (an earlier output is replaced only once the new one is complete)",
        )


def check_room_for(folder: os.PathLike | str, needed: int, what: str) -> None:
    """``check_free_space`` for files that need random writes: on ``folder``'s disk, and on the staging disk
    too when they are built there (``StagedFile``)."""
    check_free_space(folder, needed, what)
    if refuses_random_writes(folder):
        check_free_space(staging_folder(), needed, f"{what} (built there, then copied)")


def write_error(
    path: os.PathLike | str,
    exc: BaseException,
    needed: int | None = None,
    folder: os.PathLike | str | None = None,
    free_at_start: int | None = None,
) -> OutputWriteError:
    """One line for a failed write of ``path`` (libraries such as HDF5 raise several lines, or no errno);
    ``folder``: where the bytes were going, when not beside ``path`` (a local staging folder);
    ``free_at_start``: the free space when the write began (at the failure the partial file has taken it)."""
    if isinstance(exc, OutputWriteError):
        return exc
    path = pathlib.Path(path)
    folder = pathlib.Path(folder) if folder is not None else path.parent
    code = getattr(exc, "errno", None)
    if code is None:  # HDF5 keeps the errno only in its message text
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code == errno.ENOSPC:
        need = f"needs about {_mb(needed)}; " if needed else ""
        free = free_at_start if free_at_start is not None else free_bytes(folder)
        have = f"{_mb(free)} was free in {folder}" if free is not None else f"free space in {folder} unknown"
        return OutputWriteError(errno.ENOSPC, f"{path}: no space left on device ({need}{have})")
    if code is not None:
        return OutputWriteError(code, f"{path}: cannot write ({os.strerror(code)})")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OutputWriteError(f"{path}: cannot write ({first})")
