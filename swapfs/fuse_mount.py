"""Mounting the swapfs view: stale-mount cleanup, the pyfuse3 main loop inside the caller's
trio loop, and recovery from a connection abort.

`serve_fuse(space, mountpoint)` is meant for `await nursery.start(serve_fuse, space, mnt)`
in the daemon. It mounts with auto_unmount (a helper fusermount3 unmounts if the daemon
dies), cleans a stale mount left by a killed daemon first (ENOTCONN -> lazy unmount), and
when the kernel connection is aborted (/sys/fs/fuse/connections/N/abort) — after which
pyfuse3.main() returns normally and the mount stays behind — it logs, unmounts lazily and
mounts again. An admin's `fusermount3 -u` ends it quietly. pyfuse3 keeps global state: one
mount per process.

`python -m swapfs.fuse_mount --swap-dir DIR --mount DIR` mounts an existing swap directory
on its own (inspection, tests); the daemon must not be running on that directory.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import subprocess

import pyfuse3
import trio

from swapfs.errors import SwapBusyError, SwapConfigError
from swapfs.fuse_view import SwapFsOperations
from swapfs.swap_space import SwapSpace

log = logging.getLogger("kvmm.swapfs")

FSNAME = "kvmm-swapfs"


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def mount_entry(mountpoint: str) -> tuple[str, str] | None:
    """(fstype, source) of the file system mounted exactly at `mountpoint`, if any."""
    path = os.path.realpath(mountpoint) if os.path.isdir(mountpoint) else \
        os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and _unescape(fields[4]) == path:
                fstype, source = right.split()[:2]
                found = (fstype, _unescape(source))  # the last one is on top
    return found


def lazy_unmount(mountpoint: str) -> None:
    for cmd in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise SwapConfigError(f"cannot unmount the stale mount at {mountpoint}; run"
                          f" 'fusermount3 -u -z {mountpoint}' as root")


def clean_stale_mount(mountpoint: str) -> None:
    """Make `mountpoint` an empty directory ready to mount on: unmount a dead FUSE mount
    (ENOTCONN: its daemon was killed), refuse a live one or any other file system."""
    try:
        os.stat(mountpoint)
        alive = True
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT):
            raise
        alive = exc.errno == errno.ENOENT
        if not alive:
            log.warning("swapfs: cleaning the stale mount at %s (%s)", mountpoint, exc.strerror)
            lazy_unmount(mountpoint)
    entry = mount_entry(mountpoint) if alive else None
    if entry is not None:
        fstype, source = entry
        if fstype.startswith("fuse") and source == FSNAME:
            raise SwapBusyError(f"{mountpoint} is served by another live kvmm swapfs; stop it"
                                " or choose another --mount")
        raise SwapConfigError(f"{mountpoint} already has a {fstype} file system mounted;"
                              " choose another --mount")
    os.makedirs(mountpoint, exist_ok=True)


async def serve_fuse(space: SwapSpace, mountpoint: str, *, allow_other: bool = False,
                     limiter: trio.CapacityLimiter | None = None, remount_delay: float = 1.0,
                     max_remounts: int = 10, session_namer=None, hooks=None,
                     mount_fd=None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount the view of `space` at `mountpoint` and serve it until cancelled (then unmount)
    or unmounted from outside. `task_status.started(ops)` once the first mount is up.

    `mount_fd`, when given, is a blocking callable returning (fd, holder): a /dev/fuse fd
    already mounted at `mountpoint` by someone else (the privileged view mounter) and an
    object whose close() lets go of that mount; libfuse serves it as `/dev/fd/N`. Without it
    libfuse mounts (as root, or through fusermount3)."""
    ops = SwapFsOperations(space, limiter, session_namer, hooks)
    options = {f"fsname={FSNAME}", "subtype=kvmm", "default_permissions", "noatime"}
    if mount_fd is None:
        options.add("auto_unmount")
    if allow_other:
        options.add("allow_other")
    remounts = 0
    while True:
        holder = None
        if mount_fd is None:
            await trio.to_thread.run_sync(clean_stale_mount, mountpoint)
            pyfuse3.init(ops, mountpoint, options)
        else:
            fd, holder = await trio.to_thread.run_sync(mount_fd)
            pyfuse3.init(ops, f"/dev/fd/{fd}", options)     # libfuse closes fd on close()
        log.info("swapfs: mounted at %s", mountpoint)
        if remounts == 0:
            task_status.started(ops)
        try:
            await pyfuse3.main()
        except BaseException:
            pyfuse3.close(unmount=True)
            if holder is not None:
                holder.close()
            raise
        still_mounted = mount_entry(mountpoint) is not None
        pyfuse3.close(unmount=False)
        if holder is not None:
            holder.close()
            holder = None
        if not still_mounted:
            log.warning("swapfs: %s was unmounted from outside; the view stays off until the"
                        " daemon restarts (the swap space keeps working)", mountpoint)
            return
        remounts += 1
        log.error("swapfs: FUSE connection at %s was aborted; remounting (%d/%d)", mountpoint,
                  remounts, max_remounts)
        if mount_fd is None:
            await trio.to_thread.run_sync(lazy_unmount, mountpoint)
        if remounts > max_remounts:
            log.error("swapfs: giving up on the FUSE view at %s after %d aborts", mountpoint,
                      max_remounts)
            return
        await trio.sleep(remount_delay)


def open_existing(swap_dir: str, **kwargs) -> SwapSpace:
    """Open a swap directory with the layout and size recorded in its metadata."""
    from swapfs.layout import KVLayout
    from swapfs.metadata import Metadata
    from swapfs.slot_store import SUPER_BYTES, slot_stride
    from swapfs.swap_space import META_FILE
    meta = Metadata(os.path.join(swap_dir, META_FILE))
    try:
        ident = meta.identity()
    finally:
        meta.close()
    if not ident:
        raise SwapConfigError(f"{swap_dir} holds no kvmm swap space; give the daemon's --swap-dir")
    layout = KVLayout.from_json(ident["layout"])
    size = SUPER_BYTES + int(ident["num_slots"]) * slot_stride(layout.block_bytes)
    return SwapSpace(swap_dir, size, layout, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swapfs.fuse_mount",
                                     description="Mount a kvmm swap directory's FUSE view.")
    parser.add_argument("--swap-dir", required=True)
    parser.add_argument("--mount", required=True)
    parser.add_argument("--allow-other", action="store_true")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    space = open_existing(args.swap_dir, calibrate=False)
    try:
        trio.run(_serve_until_signal, space, args.mount, args.allow_other)
    finally:
        space.close()
    return 0


async def _serve_until_signal(space: SwapSpace, mountpoint: str, allow_other: bool) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
                await serve_fuse(space, mountpoint, allow_other=allow_other,
                                 task_status=task_status)
                nursery.cancel_scope.cancel()  # unmounted from outside
            await nursery.start(serve)
            print(f"swapfs: mounted at {mountpoint}", flush=True)
            async for _sig in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    raise SystemExit(main())
