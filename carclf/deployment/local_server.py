"""One home for "start `mlflow models serve` on this machine and wait until /ping answers".

Used by the `carclf-local` deployment target (detached servers that outlive the CLI), the serving tests and the
serving benchmark (``LocalServer``: a server for the length of a ``with`` block). The server runs this
interpreter's MLflow with ``--env-manager local`` in its own session, so its whole process tree (mlflow CLI,
uvicorn, workers) is one process group; its output goes to a log file whose tail explains a failed start.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping

from carclf.compute.ports import free_port

LOG_TAIL_LINES = 30
POLL_INTERVAL_S = 0.5


class ServerStartError(RuntimeError):
    """The server exited or did not answer /ping in time; the message ends with the tail of its log."""


def serving_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def serve_command(model_uri: str, host: str, port: int, workers: int = 1, timeout: int | None = None) -> list[str]:
    """`mlflow models serve` of this interpreter; ``timeout`` (request seconds, -t) only when given."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        str(model_uri),
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(workers),
    ]
    if timeout is not None:
        command += ["-t", str(timeout)]
    return command


def serving_env(extra: Mapping[str, str] | None = None) -> dict:
    """This environment for the server: `mlflow models serve` execs `uvicorn` by name, so this interpreter's
    scripts folder goes first on PATH; telemetry stays off unless the caller set it."""
    env = os.environ.copy()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.update(extra or {})
    return env


def ping(url: str, timeout: float = 2.0, path: str = "/ping") -> str | None:
    """None when ``url`` + ``path`` answers 200, else why not."""
    import requests

    try:
        response = requests.get(url + path, timeout=timeout)
    except requests.RequestException as exc:
        return f"{path} failed: {type(exc).__name__}"
    if response.status_code != 200:
        return f"{path} answered HTTP {response.status_code}"
    return None


def log_tail(path: os.PathLike | str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = pathlib.Path(path).read_text(errors="replace")
    except OSError:
        return "(no server log)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(server log is empty)"


def start_server(
    command: list[str], log_path: os.PathLike | str, env: Mapping[str, str], cwd: os.PathLike | str | None = None
) -> subprocess.Popen:
    """Start ``command`` in its own session, output appended to ``log_path`` after a line naming the command.

    Own session: the server survives the process that started it, and its whole tree shares one process group
    that ``process_group.stop_process_group`` can signal at once."""
    with open(log_path, "ab") as log:
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        log.write(f"# {stamp} {shlex.join(command)}\n".encode())
        log.flush()
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=None if cwd is None else str(cwd),
            start_new_session=True,
            close_fds=True,
        )


def wait_until_serving(
    process: subprocess.Popen, url: str, startup_timeout_s: float, path: str = "/ping"
) -> str | None:
    """Poll ``url`` + ``path`` until it answers 200 (None) or the process exits or time runs out (why, in words)."""
    deadline = time.monotonic() + startup_timeout_s
    while True:
        if process.poll() is not None:
            return f"the server exited with code {process.returncode} before answering {path}"
        reason = ping(url, timeout=2.0, path=path)
        if reason is None:
            return None
        if time.monotonic() > deadline:
            return f"the server did not answer {url}{path} within {startup_timeout_s:g} s ({reason})"
        time.sleep(POLL_INTERVAL_S)


class LocalServer:
    """`mlflow models serve` of ``model_uri`` on ``host`` (a free port unless given), up when the constructor
    returns; ``close()`` (or the end of a ``with`` block) stops it. ``env`` is added to ``serving_env()``.

    Raises ServerStartError (server stopped, log tail in the message) when it does not come up in time."""

    def __init__(
        self,
        model_uri: os.PathLike | str,
        log_path: os.PathLike | str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        cwd: os.PathLike | str | None = None,
        startup_timeout_s: float = 240.0,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.url = serving_url(host, self.port)
        self.log_path = pathlib.Path(log_path)
        command = serve_command(str(model_uri), host, self.port, workers)
        self.process = start_server(command, self.log_path, serving_env(env), cwd=cwd)
        try:
            reason = wait_until_serving(self.process, self.url, startup_timeout_s)
        except BaseException:  # Ctrl-C while waiting: no server left behind
            self.stop()
            raise
        if reason is not None:
            self.stop()
            raise ServerStartError(f"{reason}; server log {self.log_path}, last lines:\n{log_tail(self.log_path)}")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server, SIGKILL it when it has not exited after ``grace_s``."""
        self.process.terminate()
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
