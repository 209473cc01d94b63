"""Stopping a server the tests started with ``start_new_session=True`` (it leads its own process group, so its
workers are stopped with it): SIGTERM, then SIGKILL if it has not ended within the grace time."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def stop_process_group(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


def wait_until(condition, timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` has passed; its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(interval_s)
    return True
