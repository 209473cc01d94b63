"""Detached server processes: is the one we started still alive, and stop its whole process group.

A server started with ``start_new_session=True`` leads its own process group (group id = its pid), so the
mlflow CLI, uvicorn and its workers can be signalled at once. A pid is recorded with its start time, so a pid
the kernel has recycled for an unrelated process is never mistaken for ours, nor signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import signal
import sys
import time

_logger = logging.getLogger(__name__)

STOP_GRACE_S = 10.0


def process_start_time(pid: int) -> str | None:
    """Start time of a live (non-zombie) process in clock ticks since boot, or None when it is gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def process_alive(pid: int, start_time: str | None) -> bool:
    if not pid:
        return False
    if sys.platform.startswith("linux"):
        current = process_start_time(pid)
        return current is not None and (start_time is None or current == start_time)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group; Linux reads /proc, elsewhere a signal-0 probe."""
    if not sys.platform.startswith("linux"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = pathlib.Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _reap(pid: int) -> None:
    """Collect the exit status when the server is our own child (the Python API path), so no zombie stays."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_process_group(pid: int, start_time: str | None, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM the server's whole process group (CLI, uvicorn, its workers), SIGKILL what is left.

    The group id equals the pid because the server was started in its own session. A recycled pid that no
    longer matches the recorded start time is left alone. Returns True when something was signalled.
    """
    if not pid:
        return False
    if start_time is not None and sys.platform.startswith("linux"):
        current = process_start_time(pid)
        if current is not None and current != start_time:
            _logger.warning("pid %s was reused by another process; not signalling it", pid)
            return False
    if not group_members(pid):
        _reap(pid)
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            _reap(pid)
            if not group_members(pid):
                return True
            time.sleep(0.1)
    _reap(pid)
    return True
