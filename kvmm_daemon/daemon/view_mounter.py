"""ViewMounter: the one privileged step of the swapfs view, in a process of its own.

Mounting a FUSE file system needs CAP_SYS_ADMIN (or fusermount3's setuid path) and a mount
namespace shared with the host; serving it needs neither. So, as fusermount3 does for libfuse,
a small helper (`kvmm view-mounter`, unit kvmm-view.service behind kvmm-view.socket) opens
/dev/fuse, mounts it at the configured mount point with `allow_other,default_permissions`
and the engine's uid as the mount's owner, and hands the file descriptor to the engine over
a Unix socket (SCM_RIGHTS). The engine serves that fd with pyfuse3 (`/dev/fd/N` as the mount
point, which libfuse takes as an already mounted fd) and, being the only process that answers
requests, enforces per-uid visibility itself (swapfs/fuse_view.py filters by the caller's uid).
So the engine runs with no capabilities in its own mount namespace, and the helper holds
CAP_SYS_ADMIN and nothing else it does not need.

Protocol (one mount per connection): the engine connects and sends `mount\\n`; the helper
answers `ok MOUNTPOINT\\n` with the fd attached, or `error MESSAGE\\n`. The helper then waits for
the connection to close (the engine exited, or it lets go of the view to remount) and unmounts
lazily, as fusermount3's auto_unmount does. Only the uid the helper was told to serve (and
root) may ask; the mount point comes from the helper's own (root-owned) configuration, never
from the peer.

Left out: more than one mount per helper at a time (connections are served one after the
other; a second engine waits in the backlog).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import socket
import struct

from swapfs.fuse_mount import FSNAME, lazy_unmount, mount_entry

log = logging.getLogger("kvmm.view_mounter")

MS_NOSUID, MS_NODEV, MS_NOATIME = 2, 4, 1024
REQUEST = b"mount\n"


class ViewMountError(OSError):
    """The helper could not be reached or refused; the message names the fix."""


def mount_fuse_fd(mountpoint: str, uid: int, gid: int) -> int:
    """Open /dev/fuse and mount it at `mountpoint` for `uid` (allow_other: every user may look;
    the server filters by uid). Returns the fd; raises OSError naming the culprit."""
    entry = mount_entry(mountpoint) if os.path.isdir(mountpoint) else None
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise
        entry = ("fuse.kvmm", FSNAME)                       # a dead view: ours to clean
    if entry is not None:
        if not (entry[0].startswith("fuse") and entry[1] == FSNAME):
            raise OSError(errno.EBUSY, f"{mountpoint} already has a {entry[0]} file system "
                          f"mounted; choose another engine.mount")
        log.warning("unmounting the previous swapfs view at %s", mountpoint)
        lazy_unmount(mountpoint)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    data = (f"fd={fd},rootmode=40000,user_id={uid},group_id={gid},"
            f"default_permissions,allow_other").encode()
    if libc.mount(FSNAME.encode(), os.fsencode(mountpoint), b"fuse.kvmm",
                  ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOATIME), data) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount of the swapfs view at {mountpoint} failed: {os.strerror(err)}"
                      f" (the helper needs CAP_SYS_ADMIN and /dev/fuse)")
    return fd


class ViewMounter:
    """Serves mount requests on a listening Unix socket, one connection at a time.

    Attributes:
      mountpoint: where every mount goes (from the helper's configuration).
      uid, gid: the engine's user; the mount's owner. Only peers with this uid (or root) are served.
      mounts: how many mounts were handed out (statistics).
    """

    def __init__(self, mountpoint: str, user: str):
        pw = pwd.getpwnam(user)
        self.mountpoint = mountpoint
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.mounts = 0

    def serve_forever(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                self.serve_one(conn)

    def serve_one(self, conn: socket.socket) -> None:
        pid, peer_uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if peer_uid not in (self.uid, 0):
            log.warning("refused a mount request from uid %d (pid %d): only uid %d is served",
                        peer_uid, pid, self.uid)
            conn.sendall(f"error uid {peer_uid} may not mount the view\n".encode())
            return
        if conn.recv(64) != REQUEST:
            return
        try:
            fd = mount_fuse_fd(self.mountpoint, self.uid, self.gid)
        except OSError as exc:
            log.error("cannot mount the swapfs view for pid %d: %s", pid, exc.strerror or exc)
            conn.sendall(f"error {exc.strerror or exc}\n".encode())
            return
        try:
            socket.send_fds(conn, [f"ok {self.mountpoint}\n".encode()], [fd])
        finally:
            os.close(fd)
        self.mounts += 1
        log.info("mounted the swapfs view at %s for pid %d (uid %d)", self.mountpoint, pid, peer_uid)
        while conn.recv(64):                     # held until the engine lets go
            pass
        if mount_entry(self.mountpoint) is not None:
            lazy_unmount(self.mountpoint)
        log.info("pid %d let go of the view; unmounted %s", pid, self.mountpoint)


def request_view_fd(path: str, timeout: float = 30.0) -> tuple[int, socket.socket]:
    """The engine's side: a mounted /dev/fuse fd from the helper at `path`, and the connection
    to keep open while the fd is served (closing it tells the helper to unmount)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
        conn.sendall(REQUEST)
        msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
    except OSError as exc:
        conn.close()
        raise ViewMountError(exc.errno or errno.EIO, f"the view mounter at {path} is not reachable"
                             f" ({exc.strerror or exc}); start kvmm-view.socket or unset "
                             f"daemon.view_mounter") from None
    text = msg.decode(errors="replace").strip()
    if not text.startswith("ok ") or not fds:
        for fd in fds:
            os.close(fd)
        conn.close()
        raise ViewMountError(errno.EIO, f"the view mounter at {path} refused: "
                             f"{text.removeprefix('error ') or 'no answer'}")
    conn.settimeout(None)
    return fds[0], conn
