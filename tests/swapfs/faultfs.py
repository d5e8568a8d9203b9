"""faultfs: a flat pass-through FUSE file system that fails I/O on demand, for fault tests.

This kernel has no device-mapper (no dm-error/dm-flakey) and no fail_make_request, so the
swap tests put the slot file on this file system instead: it passes everything through to a
backing directory, with those files opened direct_io (no page cache, so an O_DIRECT caller
sees each failure at once), and while `<control>/read_eio` or `<control>/write_eio` exists
it answers reads or writes of `*.slots` (swap) and `*.kvw` (weight) files with EIO
(`<control>/write_enospc`: ENOSPC).

Run: python faultfs.py BACKING_DIR MOUNTPOINT CONTROL_DIR  (prints "ready" once mounted;
SIGTERM unmounts).
"""
from __future__ import annotations

import errno
import os
import signal
import sys

import pyfuse3
import trio

FAULTY = (".slots", ".kvw")   # swap slot files and weight files: direct_io, and faulted on demand


class FaultFS(pyfuse3.Operations):
    def __init__(self, backing: str, control: str) -> None:
        super().__init__()
        self.backing, self.control = backing, control
        self.names: dict[int, str] = {}
        self.inos: dict[str, int] = {}
        self.fds: dict[int, tuple[int, str]] = {}

    def _path(self, name: str) -> str:
        return os.path.join(self.backing, name)

    def _fault(self, name: str, what: str) -> None:
        if name.endswith(FAULTY):
            if os.path.exists(os.path.join(self.control, f"{what}_eio")):
                raise pyfuse3.FUSEError(errno.EIO)
            if what == "write" and os.path.exists(os.path.join(self.control, "write_enospc")):
                raise pyfuse3.FUSEError(errno.ENOSPC)

    def _attr(self, ino: int, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        a = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                      "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, field, getattr(st, field))
        a.st_ino, a.st_blksize = ino, 4096
        a.attr_timeout = a.entry_timeout = 0
        return a

    def _ino(self, name: str) -> int:
        if name not in self.inos:
            ino = len(self.inos) + 2
            self.inos[name], self.names[ino] = ino, name
        return self.inos[name]

    def _ino_path(self, ino: int) -> str:
        return self.backing if ino == pyfuse3.ROOT_INODE else self._path(self.names[ino])

    async def lookup(self, parent, name, ctx):
        name = os.fsdecode(name)
        if not os.path.lexists(self._path(name)):
            raise pyfuse3.FUSEError(errno.ENOENT)
        ino = self._ino(name)
        return self._attr(ino, self._path(name))

    async def getattr(self, inode, ctx):
        return self._attr(inode, self._ino_path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._ino_path(inode)
        if fields.update_size:
            os.truncate(path, attr.st_size)
        return self._attr(inode, path)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        names = sorted(os.listdir(self.backing))
        for i, name in enumerate(names[start_id:], start_id):
            attr = self._attr(self._ino(name), self._path(name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    async def statfs(self, ctx):
        st = os.statvfs(self.backing)
        s = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(s, field, getattr(st, field))
        return s

    def _open_fd(self, name: str, flags: int) -> pyfuse3.FileInfo:
        flags &= ~(os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        fd = os.open(self._path(name), flags)
        self.fds[fd] = (fd, name)
        fi = pyfuse3.FileInfo(fh=fd)
        fi.direct_io = name.endswith(FAULTY)  # SQLite's -shm needs shared mmap
        return fi

    async def open(self, inode, flags, ctx):
        if flags & os.O_TRUNC:
            os.truncate(self._ino_path(inode), 0)
        return self._open_fd(self.names[inode], flags)

    async def create(self, parent, name, mode, flags, ctx):
        name = os.fsdecode(name)
        os.close(os.open(self._path(name), os.O_CREAT | os.O_WRONLY, mode & 0o7777))
        fi = self._open_fd(name, flags)
        return fi, self._attr(self._ino(name), self._path(name))

    async def read(self, fh, off, size):
        self._fault(self.fds[fh][1], "read")
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        self._fault(self.fds[fh][1], "write")
        return os.pwrite(fh, buf, off)

    async def fsync(self, fh, datasync):
        os.fsync(fh)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        self.fds.pop(fh, None)
        os.close(fh)

    async def unlink(self, parent, name, ctx):
        os.unlink(self._path(os.fsdecode(name)))


async def _main(backing: str, mountpoint: str, control: str) -> None:
    pyfuse3.init(FaultFS(backing, control), mountpoint, {"fsname=faultfs", "auto_unmount"})
    print("ready", flush=True)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            async for _sig in signals:
                nursery.cancel_scope.cancel()
                break
    pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(_main, *sys.argv[1:4])
