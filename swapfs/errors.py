"""Typed errors of the flash tier.

Every failure of swapfs reaches the engine as a `SwapError` subclass whose `kind` names the
counter it bumps in `SwapStats.errors`; the engine answers any of them by recomputing the KV
it wanted. Messages are one line naming the culprit and the fix, like all `KvmmError`s.
"""
from __future__ import annotations

import errno as _errno

from kvmm_daemon.errors import CapacityError, ConfigError, KvmmError


class SwapError(KvmmError):
    """Base of all swapfs failures; `kind` is the statistics counter it belongs to."""

    kind = "error"
    errno = _errno.EIO


class SwapFullError(SwapError, CapacityError):
    """Every slot holds a block that may not be evicted (sessions, swapped-out blocks)."""

    kind = "full"
    errno = _errno.ENOSPC


class SwapNoSpaceError(SwapError):
    """The file system under --swap-dir is full (ENOSPC/EDQUOT from a write or a commit)."""

    kind = "enospc"
    errno = _errno.ENOSPC


class SwapIOError(SwapError):
    """The device failed a read or write (EIO and other OSErrors of the slot file)."""

    kind = "eio"
    errno = _errno.EIO


class SlotCorruptError(SwapError):
    """A slot's header or checksum does not match what the metadata committed (torn write,
    bit rot, or a slot overwritten since): the data is never returned."""

    kind = "corrupt"
    errno = _errno.EIO


class SwapNotFoundError(SwapError, KeyError):
    """An unknown session id, prefix hash or a handle that was already freed."""

    kind = "not_found"
    errno = _errno.ENOENT

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SessionExistsError(SwapError, FileExistsError):
    """A session of that id is stored already (an import never overwrites one)."""

    kind = "exists"
    errno = _errno.EEXIST


class SwapConflictError(SwapError):
    """A deferred save found its session changed on flash (deleted, imported or saved again)
    between its writes and its commit: the save is dropped, the stored version kept."""

    kind = "conflict"
    errno = _errno.EAGAIN


class SwapFormatError(SwapError, ValueError):
    """An export file or a payload does not fit this swap space (bad header, wrong layout,
    wrong size, checksum mismatch on import)."""

    kind = "format"
    errno = _errno.EINVAL


class SwapBusyError(SwapError):
    """Another process holds the swap directory open."""

    kind = "busy"
    errno = _errno.EBUSY


class SwapConfigError(SwapError, ConfigError):
    """--swap-dir / --swap-size cannot hold a swap space for this model."""

    kind = "config"
    errno = _errno.EINVAL


def from_os_error(exc: OSError, what: str) -> SwapError:
    """Map an OSError of the slot file or the metadata file to its typed error."""
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return SwapNoSpaceError(f"{what}: no space left on the swap file system ({exc.strerror});"
                                " free space under --swap-dir or lower --swap-size")
    return SwapIOError(f"{what}: {exc.strerror or exc} (errno {exc.errno}); check the device under"
                       " --swap-dir (dmesg) — swapped KV will be recomputed meanwhile")
