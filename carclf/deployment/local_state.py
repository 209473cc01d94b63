"""The `carclf-local` target's state folder: one JSON record per deployment, plus the servers' logs.

A record is written under a partial name and renamed (``carclf.files.atomic``), so a reader sees the old record
or the new one, never half of one; create/update/delete of one name are serialised across processes by a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib

from carclf.deployment.local_config import NAME_PATTERN, DeploymentError, validate_name
from carclf.files.atomic import atomic_output


def default_home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CARCLF_DEPLOY_HOME") or pathlib.Path.home() / ".carclf" / "deployments")


class StateStore:
    """One JSON record per deployment, written to a partial name and renamed (atomic switch)."""

    def __init__(self, home: pathlib.Path):
        self.home = home
        self.logs = home / "logs"

    def ensure(self):
        self.logs.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> pathlib.Path:
        return self.home / f"{validate_name(name)}.json"

    @contextlib.contextmanager
    def lock(self, name: str):
        """Serialise create/update/delete of one name across processes. The lock file exists only while the
        name has a record (or someone holds the lock): it is removed, still locked, when the record is gone, and
        a process that was waiting on the removed file locks the current one instead."""
        self.ensure()
        path = self.home / f".{validate_name(name)}.lock"
        while True:
            handle = open(path, "a")  # noqa: SIM115  (closed below)
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()  # the file was removed while this process waited for it
        try:
            yield
        finally:
            if not self.path(name).exists():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def read(self, name: str) -> dict | None:
        path = self.path(name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise DeploymentError(f"deployment record {path} is corrupt ({exc}); delete it by hand") from None

    def write(self, record: dict) -> None:
        self.ensure()
        # On disk before the rename: the record names a running server that a crash must not lose.
        with atomic_output(self.path(record["name"])) as partial, open(partial, "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self, name: str) -> None:
        """Remove the record (called under ``lock(name)``, which then removes the lock file)."""
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()

    def names(self) -> list[str]:
        if not self.home.is_dir():
            return []
        return sorted(p.stem for p in self.home.glob("*.json") if NAME_PATTERN.match(p.stem))
