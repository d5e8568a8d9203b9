"""RequestQueue: the pieces waiting for a backend, in strict (priority, deadline, FIFO) order,
with the index that finds a piece's file neighbours for merging.

`pop_transfer` takes the first piece in order and grows it into a Transfer with the queued
pieces that continue it in the same file with the same op, forwards then backwards, up to
`max_bytes` and `max_iov` buffers (a piece may hold several). Neighbours ride along whatever
their priority: they cost no extra syscall. Pieces of a request submitted with merge=False are
never merged: they are not indexed as neighbours and leave the queue as transfers of their own.
Promotion pushes a new heap entry and leaves the old one to be skipped (lazy deletion), so it
is O(log n).

Prior art: the block layer's elevator back/front merges (blk-merge.c), the lazy-deletion heap
of Python's sched/heapq docs. Left out: reordering by file offset within a class (flash has
no seek cost).
"""
from __future__ import annotations

import heapq

from iosched.request import IORequest, Priority
from iosched.transfer import Piece, Transfer


class RequestQueue:
    """Not thread-safe: the scheduler calls it under its lock.

    Attributes:
      _heap: (key, piece) entries; an entry is live iff piece.queued and entry key ==
        piece.key (promotion and removal leave dead entries behind, skipped on pop).
      _by_start[(fd, op, offset)] / _by_end[(fd, op, end)]: a queued piece of a merging
        request starting / ending there (one per position; a second piece at the same position
        is just not merged).
      _count: number of queued pieces.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, Piece]] = []
        self._by_start: dict[tuple, Piece] = {}
        self._by_end: dict[tuple, Piece] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def push(self, piece: Piece) -> None:
        assert not piece.queued
        piece.queued = True
        self._count += 1
        heapq.heappush(self._heap, (piece.key, piece))
        r = piece.request
        if r.merge:
            self._by_start.setdefault((r.fd, r.op, piece.offset), piece)
            self._by_end.setdefault((r.fd, r.op, piece.end), piece)

    def _remove(self, piece: Piece) -> None:
        assert piece.queued
        piece.queued = False
        self._count -= 1
        r = piece.request
        for index, pos in ((self._by_start, piece.offset), (self._by_end, piece.end)):
            k = (r.fd, r.op, pos)
            if index.get(k) is piece:
                del index[k]
        r._pieces.remove(piece)

    def promote(self, request: IORequest, priority: Priority) -> bool:
        """Raise the queued pieces of `request` to `priority`; True if any was queued."""
        if priority >= request.priority:
            return any(p.queued for p in request._pieces)
        request.priority = priority
        moved = False
        for p in request._pieces:
            if p.queued:
                p.key = (int(priority),) + p.key[1:]
                heapq.heappush(self._heap, (p.key, p))
                moved = True
        return moved

    def pop_transfer(self, max_bytes: int, max_iov: int) -> Transfer | None:
        while self._heap:
            key, head = heapq.heappop(self._heap)
            if head.queued and key == head.key:
                break
        else:
            return None
        self._remove(head)
        r = head.request
        if not r.merge:
            return Transfer([head])
        pieces = [head]
        total = head.length
        iov = len(head.views)
        end = head.end
        while True:                            # forward: pieces that start where we end
            nxt = self._by_start.get((r.fd, r.op, end))
            if nxt is None or total + nxt.length > max_bytes or iov + len(nxt.views) > max_iov:
                break
            self._remove(nxt)
            pieces.append(nxt)
            total += nxt.length
            iov += len(nxt.views)
            end = nxt.end
        front = []
        start = head.offset
        while True:                            # backward: pieces that end where we start
            prv = self._by_end.get((r.fd, r.op, start))
            if prv is None or total + prv.length > max_bytes or iov + len(prv.views) > max_iov:
                break
            self._remove(prv)
            front.append(prv)
            total += prv.length
            iov += len(prv.views)
            start = prv.offset
        front.reverse()
        return Transfer(front + pieces)
