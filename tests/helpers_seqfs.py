"""A FUSE file system that, like Unity Catalog Volumes and DBFS, takes only sequential writes.

``python helpers_seqfs.py BACKING MOUNTPOINT`` mounts BACKING at MOUNTPOINT (fstype ``fuse.seqfs``) in the
foreground. Every file operation passes through to BACKING, except that a write must start where the file
currently ends: writing anywhere else (what HDF5 does when it updates its superblock) fails with EOPNOTSUPP,
the errno Databricks' FUSE gives for a random write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import subprocess
import sys
import time


def fuse_missing() -> str | None:
    """Why a FUSE mount cannot be made here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    try:
        import fuse  # noqa: F401  (fusepy, which loads libfuse.so.2)
    except (ImportError, OSError) as exc:
        return f"fusepy/libfuse2 unavailable ({exc})"
    return None


@contextlib.contextmanager
def sequential_only_mount(root: pathlib.Path):
    """A mounted sequential-only folder under ``root`` (like /Volumes/<catalog>/<schema>/<volume>); unmounted
    when the block ends."""
    backing, mountpoint = root / "backing", root / "mnt"
    backing.mkdir(parents=True)
    mountpoint.mkdir()
    server = subprocess.Popen(
        [sys.executable, __file__, str(backing), str(mountpoint)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    try:
        while not os.path.ismount(mountpoint):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the FUSE mount did not come up: {server.stderr.read().decode()[-500:]}")
            time.sleep(0.05)
        yield mountpoint
    finally:
        subprocess.run(["fusermount", "-u", str(mountpoint)], check=False, capture_output=True)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _serve(backing: str, mountpoint: str) -> None:
    from fuse import FUSE

    FUSE(_operations()(backing), mountpoint, foreground=True, nothreads=True, fsname="seqfs", subtype="seqfs")


def _operations():
    from fuse import FuseOSError, Operations

    return type("SequentialOnly", (_SequentialOnly, Operations), {"error": FuseOSError})


class _SequentialOnly:
    def __init__(self, root: str):
        self.root = os.path.realpath(root)

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _call(self, function, *args):
        try:
            return function(*args)
        except OSError as exc:
            raise self.error(exc.errno or errno.EIO) from None

    def access(self, path, mode):
        if not os.access(self._full(path), mode):
            raise self.error(errno.EACCES)

    def getattr(self, path, fh=None):
        st = self._call(os.lstat, self._full(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {key: getattr(st, key) for key in keys}

    def readdir(self, path, fh):
        return [".", "..", *self._call(os.listdir, self._full(path))]

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize")
        return {key: getattr(st, key) for key in keys} | {"f_namemax": st.f_namemax}

    def chmod(self, path, mode):
        return self._call(os.chmod, self._full(path), mode)

    def chown(self, path, uid, gid):
        return self._call(os.chown, self._full(path), uid, gid)

    def utimens(self, path, times=None):
        return self._call(os.utime, self._full(path), times)

    def mkdir(self, path, mode):
        return self._call(os.mkdir, self._full(path), mode)

    def rmdir(self, path):
        return self._call(os.rmdir, self._full(path))

    def unlink(self, path):
        return self._call(os.unlink, self._full(path))

    def rename(self, old, new):
        return self._call(os.replace, self._full(old), self._full(new))

    def open(self, path, flags):
        return self._call(os.open, self._full(path), flags)

    def create(self, path, mode, fi=None):
        return self._call(os.open, self._full(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, size, offset, fh):
        return self._call(os.pread, fh, size, offset)

    def write(self, path, data, offset, fh):
        end = os.fstat(fh).st_size
        if offset != end:
            raise self.error(errno.EOPNOTSUPP)
        return self._call(os.pwrite, fh, data, offset)

    def truncate(self, path, length, fh=None):
        # Only to empty (an O_TRUNC open): a real Volume cannot shorten or extend a file in place either.
        if length != 0:
            raise self.error(errno.EOPNOTSUPP)
        with open(self._full(path), "r+b") as handle:
            handle.truncate(0)

    def flush(self, path, fh):
        return self._call(os.fsync, fh)

    def fsync(self, path, datasync, fh):
        return self._call(os.fsync, fh)

    def release(self, path, fh):
        return self._call(os.close, fh)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
