"""Long-running steps end with the process that started them.

`mlflow run` starts a step as its child (``bash -c``, which execs the command) and, when it is itself
terminated, exits without passing the signal on: a serving step would go on holding its port with nobody left
to stop it. ``end_with_parent`` asks Linux to signal this process when its parent exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def end_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have ``sig`` sent to this process when its parent exits (Linux; nothing elsewhere).

    SIGTERM lets a server shut down cleanly (uvicorn handles it); a parent already gone when this is called
    gets the same signal at once.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:  # the parent exited before the request was in place: no signal would come
        os.kill(os.getpid(), sig)
