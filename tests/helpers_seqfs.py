"""A FUSE file system that, like Unity Catalog Volumes and DBFS, takes only sequential writes.

``python helpers_seqfs.py BACKING MOUNTPOINT`` mounts BACKING at MOUNTPOINT (fstype ``fuse.seqfs``) in the
foreground. Every file operation passes through to BACKING, except that a write must start where the file
currently ends: writing anywhere else (what HDF5 does when it updates its superblock) fails with EOPNOTSUPP,
the errno Databricks' FUSE gives for a random write.
"""

from __future__ import annotations

import errno
import os
import sys

from fuse import FUSE, FuseOSError, Operations


class SequentialOnly(Operations):
    def __init__(self, root: str):
        self.root = os.path.realpath(root)

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _call(self, function, *args):
        try:
            return function(*args)
        except OSError as exc:
            raise FuseOSError(exc.errno or errno.EIO) from None

    def access(self, path, mode):
        if not os.access(self._full(path), mode):
            raise FuseOSError(errno.EACCES)

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
            raise FuseOSError(errno.EOPNOTSUPP)
        return self._call(os.pwrite, fh, data, offset)

    def truncate(self, path, length, fh=None):
        # Only to empty (an O_TRUNC open): a real Volume cannot shorten or extend a file in place either.
        if length != 0:
            raise FuseOSError(errno.EOPNOTSUPP)
        with open(self._full(path), "r+b") as handle:
            handle.truncate(0)

    def flush(self, path, fh):
        return self._call(os.fsync, fh)

    def fsync(self, path, datasync, fh):
        return self._call(os.fsync, fh)

    def release(self, path, fh):
        return self._call(os.close, fh)


if __name__ == "__main__":
    backing, mountpoint = sys.argv[1], sys.argv[2]
    FUSE(SequentialOnly(backing), mountpoint, foreground=True, nothreads=True, fsname="seqfs", subtype="seqfs")
