"""Priority and IORequest: what a caller submits and the handle it waits on.

A request may be served as several pieces (split at the profile's request size) and a piece
may share one vectored syscall with its neighbours (merged); the request is done when its
last piece is. Prior art: the Linux block layer's request/bio split, io_uring's user_data
handles. Left out: cancellation (a queued read is cheap to let finish).
"""
from __future__ import annotations

import enum
import threading


class Priority(enum.IntEnum):
    """Service class of a request; lower value is served first."""
    WEIGHT_READ = 0       # a read the forward is waiting on now
    KV_SWAP_IN = 1
    WEIGHT_PREFETCH = 2
    KV_WRITE_BACK = 3


class IORequest:
    """The handle `IOScheduler.submit_read/submit_write` returns; equal by identity.

    Attributes:
      op: "read" or "write".
      fd, offset, length: the file range; length == sum of len(buffers) > 0.
      buffers: the caller's memory (flat byte memoryviews, filled from / written to the
        file range in order; one for submit_read/submit_write, several for the vectored
        submit_readv/submit_writev); the caller must not touch them until `done()`.
      buffer: buffers[0] when there is one buffer, else None.
      priority: the current service class (raised to WEIGHT_READ by a promoting wait while
        any piece is still queued); deadline: time.monotonic() seconds or None (= last).
      merge: its pieces may share a transfer with queued neighbours in the file (False: each
        piece is a transfer of its own, completing on its own).
      on_done: None, or a function of the request that a backend thread runs once every byte
        has arrived and before the request is done (IOScheduler.submit_readv).
      result: bytes transferred, set iff done() and the transfer succeeded (== length).
      error: the IOReadError/IOWriteError (or the exception its on_done raised), set iff
        done() and the request failed.
      completion_index: the scheduler-wide order in which requests completed (0-based),
        set when done (tests and traces read it).
    Invariant: done() iff _pieces_left == 0, on_done (if any) has returned, and exactly one
    of result/error is set.
    """

    __slots__ = ("op", "fd", "offset", "length", "buffers", "buffer", "priority", "deadline",
                 "result", "error", "completion_index", "submitted_at", "merge", "on_done",
                 "_pieces_left", "_event", "_pieces")

    def __init__(self, op: str, fd: int, offset: int, buffers: list[memoryview],
                 priority: Priority, deadline: float | None, submitted_at: float,
                 merge: bool = True, on_done=None) -> None:
        self.op = op
        self.fd = fd
        self.offset = offset
        self.buffers = tuple(buffers)
        self.buffer = buffers[0] if len(buffers) == 1 else None
        self.length = sum(len(b) for b in buffers)
        self.priority = Priority(priority)
        self.deadline = deadline
        self.result: int | None = None
        self.error: Exception | None = None
        self.completion_index: int | None = None
        self.submitted_at = submitted_at
        self.merge = merge
        self.on_done = on_done
        self._pieces_left = 0
        self._pieces: list = []       # the pieces not yet taken off the queue
        self._event = threading.Event()

    def done(self) -> bool:
        return self._event.is_set()

    def __repr__(self) -> str:
        state = ("done" if self.result is not None else "failed") if self.done() else "pending"
        return (f"<IORequest {self.op} fd={self.fd} offset={self.offset} length={self.length}"
                f" {self.priority.name} {state}>")

    # eq/hash by identity (object's defaults)
