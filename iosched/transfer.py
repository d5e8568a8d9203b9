"""Piece and Transfer: the scheduler's units below a request.

A Piece is a request's slice of at most `request_bytes`: one or more of the request's buffers
(or slices of them) that follow each other in the file, so a vectored request of many small
buffers (swapfs: a slot header and one KV piece per layer) costs the queue one piece, not one
per buffer. A Transfer is one vectored syscall
(preadv/pwritev, or one io_uring READV/WRITEV) over one or more pieces that are contiguous in
the same file, in file order. A transfer that comes back short advances over the bytes that
did arrive (completing the pieces they cover) and is resubmitted for the rest.
"""
from __future__ import annotations

import math

from iosched.request import IORequest


class Piece:
    """Attributes:
      request: the IORequest this is part of; offset: file offset; views: the buffers (or
        slices of them) it covers, in file order, none empty; length = their total;
        addrs[i]: the virtual address of views[i][0] (taken once at submit).
      seq: FIFO order of submission (unique per scheduler).
      key: (priority, deadline or inf, seq), the queue order; changes only on promotion.
      queued: the piece is in the RequestQueue (not yet part of a transfer).
    """

    __slots__ = ("request", "offset", "views", "addrs", "length", "seq", "key", "queued")

    def __init__(self, request: IORequest, offset: int, views: tuple[memoryview, ...],
                 addrs: tuple[int, ...], seq: int) -> None:
        self.request = request
        self.offset = offset
        self.views = views
        self.addrs = addrs
        self.length = sum(len(v) for v in views)
        self.seq = seq
        self.key = (int(request.priority), _deadline_key(request.deadline), seq)
        self.queued = False

    @property
    def end(self) -> int:
        return self.offset + self.length


def _deadline_key(deadline: float | None) -> float:
    return math.inf if deadline is None else deadline


class Transfer:
    """One vectored syscall's worth of pieces.

    Attributes:
      op, fd: shared by every piece; pieces: contiguous in file order
        (pieces[i].end == pieces[i+1].offset); offset/length: the whole range.
      done_bytes: bytes already transferred (a prefix of the range); _next: index of the
        first piece not yet completed. Invariant: pieces[:_next] are covered by done_bytes.
      attempts: syscalls issued for it so far (1 + retries).
      user_data: the io_uring backend's id for it while in flight.
    """

    __slots__ = ("op", "fd", "pieces", "offset", "length", "done_bytes", "attempts", "_next",
                 "user_data", "iov_keepalive")

    def __init__(self, pieces: list[Piece]) -> None:
        head = pieces[0]
        self.op = head.request.op
        self.fd = head.request.fd
        self.pieces = pieces
        self.offset = head.offset
        self.length = sum(p.length for p in pieces)
        self.done_bytes = 0
        self.attempts = 0
        self._next = 0
        self.user_data = 0
        self.iov_keepalive = None

    @property
    def position(self) -> int:
        """File offset of the first byte still to transfer."""
        return self.offset + self.done_bytes

    @property
    def remaining(self) -> int:
        return self.length - self.done_bytes

    def iov(self) -> list[memoryview]:
        """The buffers of the bytes still to transfer, in file order."""
        out: list[memoryview] = []
        if self._next == len(self.pieces):
            return out
        skip = self.position - self.pieces[self._next].offset   # within the first piece
        for p in self.pieces[self._next:]:
            for v in p.views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                out.append(v[skip:] if skip else v)
                skip = 0
        return out

    def spans(self) -> list[tuple[int, int]]:
        """(address, length) of the bytes still to transfer, in file order: iov() as an
        iovec array wants it, without taking any address anew."""
        out: list[tuple[int, int]] = []
        if self._next == len(self.pieces):
            return out
        skip = self.position - self.pieces[self._next].offset
        for p in self.pieces[self._next:]:
            for v, addr in zip(p.views, p.addrs):
                n = len(v)
                if skip >= n:
                    skip -= n
                    continue
                out.append((addr + skip, n - skip))
                skip = 0
        return out

    def advance(self, n: int) -> list[Piece]:
        """Account `n` more bytes transferred; returns the pieces that became complete."""
        assert 0 <= n <= self.remaining
        self.done_bytes += n
        done = []
        while self._next < len(self.pieces) and \
                self.pieces[self._next].end <= self.position:
            done.append(self.pieces[self._next])
            self._next += 1
        return done

    def unfinished(self) -> list[Piece]:
        return self.pieces[self._next:]
