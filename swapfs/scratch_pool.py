"""ScratchPool: O_DIRECT-ready scratch memory (slot headers, bounce areas) lent to one slot
batch at a time and returned when its I/O is over.

A write may now stay in flight after the call that submitted it returns (SlotStore's
submit_write), so scratch can no longer be per thread: the next batch of the same thread
would overwrite headers still being written. Buffers are kept by kind and reused largest
first; a borrowed buffer is never lent twice. Left out: a cap on the bytes kept (batches are
bounded by the KV pool, and the pool holds at most one buffer per concurrent batch).
"""
from __future__ import annotations

import threading

from iosched.aligned_buffer import AlignedBuffer


class ScratchPool:
    """Attributes (under `_lock`):
      _idle[kind]: buffers not lent, of that kind ("headers": 4 KiB pages; "bounce": huge
        pages); _all: every buffer made, closed by close(). A buffer is lent iff it is in
        _all and in no _idle list.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[str, list[AlignedBuffer]] = {"headers": [], "bounce": []}
        self._all: list[AlignedBuffer] = []

    def borrow(self, kind: str, nbytes: int) -> AlignedBuffer:
        """An idle buffer of `kind` holding at least `nbytes` (made when none fits)."""
        with self._lock:
            idle = self._idle[kind]
            for i, buf in enumerate(idle):
                if buf.nbytes >= nbytes:
                    return idle.pop(i)
        buf = AlignedBuffer(nbytes, huge_pages=kind == "bounce")
        with self._lock:
            self._all.append(buf)
        return buf

    def give_back(self, kind: str, buf: AlignedBuffer) -> None:
        with self._lock:
            assert buf in self._all and buf not in self._idle[kind]
            self._idle[kind].append(buf)
            self._idle[kind].sort(key=lambda b: b.nbytes)

    def close(self) -> None:
        with self._lock:
            for buf in self._all:
                buf.close()
            self._all.clear()
            for idle in self._idle.values():
                idle.clear()
