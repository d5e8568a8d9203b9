"""iosched's own errors (a leaf package: nothing here knows about kvmm or swapfs).

IOReadError / IOWriteError carry the failed request and the errno (None for a short
transfer); their messages name the file, the range and what happened, so a log line is
enough to find the culprit.
"""
from __future__ import annotations

from typing import Any


class IOSchedError(Exception):
    """Base of every error iosched raises."""


class _TransferError(IOSchedError):
    op = "transfer"

    def __init__(self, message: str, *, request: Any = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.request = request
        self.errno = errno


class IOReadError(_TransferError):
    """A read that failed, or came back short, after the scheduler's retries.
    Attributes: request (the IORequest), errno (int, or None for a short read)."""
    op = "read"


class IOWriteError(_TransferError):
    """A write that failed, or was cut short, after the scheduler's retries.
    Attributes: request (the IORequest), errno (int, or None for a short write)."""
    op = "write"


class DeviceError(IOSchedError):
    """A file or device that cannot be used as asked (e.g. no O_DIRECT); names the fix."""
