"""Where a file lives on its disk: its extents as (device, sector range), for attributing
block requests to it on tracepoints alone.

The block tracepoints name a request by the disk it goes to (`dev`, the kernel's dev_t:
major << 20 | minor) and its first sector on that disk; nothing in them names a file or an
inode (kprobes could reach the bio's page and its inode; this kernel family has none). So
the file's physical extents are asked of its file system (the FS_IOC_FIEMAP ioctl, as
filefrag does, with FIEMAP_FLAG_SYNC so delayed allocations are placed first) and turned into
sector ranges of the whole disk: a partition's extents are shifted by its start sector
(/sys/dev/block/M:m/start) and given its parent disk's number. A request whose first sector
falls in a range is the file's.

Left out, each said in the error: files on device-mapper or md devices (their requests
reach other disks at remapped sectors), on file systems without FIEMAP (tmpfs, overlay,
FUSE), inline or encoded extents, and extents that change after mapping (the daemon's
weight and swap files are preallocated once and keep theirs).
"""
from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
UNMAPPABLE = 0x2 | 0x4 | 0x8 | 0x80 | 0x200    # UNKNOWN, DELALLOC, ENCODED, ENCRYPTED, INLINE
_HEAD = struct.Struct("=QQIIII")                 # struct fiemap
_EXTENT = struct.Struct("=QQQQQIIII")            # struct fiemap_extent
BATCH = 256
SECTOR = 512


@dataclass(frozen=True, slots=True)
class Extent:
    dev: int        # kernel dev_t of the whole disk (major << 20 | minor), as the tracepoints give it
    start: int      # first sector on that disk
    end: int        # one past the last sector


def kernel_dev(major: int, minor: int) -> int:
    return (major << 20) | minor


def _sys_block(major: int, minor: int, sysfs: str) -> str:
    return os.path.join(sysfs, "dev", "block", f"{major}:{minor}")


def disk_of(st_dev: int, sysfs: str = "/sys") -> tuple[int, int]:
    """(kernel dev_t of the disk, partition start sector) of the device `st_dev` lives on.
    ValueError when its requests do not reach a disk at the file system's own sectors."""
    major, minor = os.major(st_dev), os.minor(st_dev)
    node = _sys_block(major, minor, sysfs)
    if not os.path.isdir(node):
        raise ValueError(f"device {major}:{minor} is not a block device (a network, tmpfs or FUSE file "
                         f"system); no block requests to attribute")
    for stacked in ("dm", "md"):
        if os.path.isdir(os.path.join(node, stacked)):
            raise ValueError(f"device {major}:{minor} is a {'device-mapper' if stacked == 'dm' else 'md RAID'} "
                             f"device; its requests reach other disks at remapped sectors")
    if not os.path.exists(os.path.join(node, "partition")):
        return kernel_dev(major, minor), 0
    with open(os.path.join(node, "start")) as f:
        start = int(f.read())
    with open(os.path.join(os.path.realpath(node), "..", "dev")) as f:
        pmaj, pmin = map(int, f.read().split(":"))
    return kernel_dev(pmaj, pmin), start


def fiemap(fd: int) -> list[tuple[int, int, int]]:
    """(logical, physical, length) bytes of every extent of the open file `fd`, in order.
    OSError from the file system (EOPNOTSUPP on tmpfs, overlay...); ValueError for an extent
    that has no place on the disk (delayed, inline, encoded)."""
    out: list[tuple[int, int, int]] = []
    start = 0
    while True:
        buf = bytearray(_HEAD.size + BATCH * _EXTENT.size)
        _HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        for i in range(mapped):
            logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
            if flags & UNMAPPABLE:
                raise ValueError(f"extent at byte {logical} has no fixed place on the disk (flags {flags:#x})")
            out.append((logical, physical, length))
            if flags & FIEMAP_EXTENT_LAST:
                return out
        start = logical + length


def file_extents(path: str, sysfs: str = "/sys") -> list[Extent]:
    """The sector ranges of `path` on its disk, adjacent ranges merged. ValueError naming the
    file and the reason when it cannot be mapped (see the module docstring)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot open {path}: {exc.strerror}") from None
    try:
        dev, offset = disk_of(os.fstat(fd).st_dev, sysfs)
        try:
            raw = fiemap(fd)
        except OSError as exc:
            raise ValueError(f"its file system does not map extents (FIEMAP: {exc.strerror})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    finally:
        os.close(fd)
    merged: list[Extent] = []
    for _, physical, length in raw:
        start, end = offset + physical // SECTOR, offset + -(-(physical + length) // SECTOR)
        if merged and merged[-1].end == start:
            merged[-1] = Extent(dev, merged[-1].start, end)
        else:
            merged.append(Extent(dev, start, end))
    return merged
