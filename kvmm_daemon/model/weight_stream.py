"""StreamWindow: streamed segments cycling through a few slots, reads ahead of compute.

The streamed segments are read in step order into `window` slots: while the forward computes
on the segment in one slot, the next `window - 1` are in flight (submitted to iosched as
WEIGHT_PREFETCH; the one the forward waits on is promoted to WEIGHT_READ). Asking for a
segment releases the previous one's slot, and a freed slot is refilled at once with the next
segment of the cycle, across step boundaries (the LM head's last chunk is followed by layer 0
of the next step). The forward waits only for the segment it needs; that wait is the stall.
A segment whose flash form is not its memory form (the LM head's Q8_0 chunks) is expanded in
its slot once its read has landed, on the forward's thread, before it is handed over; every
read of it lands in a freshly filled slot, so each read is expanded exactly once.

A step that skips segments (no logits wanted: the LM head is not run) is met by discarding
the entries before the one asked for; one asked for that is not in flight resets the cycle
there. A prefetch found failed is read once more when it is needed (the device may have come
back since); a read that fails then drains the window, resets it and raises WeightReadError:
the step's requests fail and the next step starts afresh; a wrong byte is never computed on.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from iosched.errors import IOSchedError
from iosched.request import Priority
from kvmm_daemon.errors import WeightReadError


@dataclass(slots=True)
class _Entry:
    pos: int            # index into `records` (the streamed segments in step order)
    slot: int
    request: object     # iosched.IORequest


class StreamWindow:
    """Attributes and invariants:
        records: streamed SegmentRecords in step order; S = len(records) >= 1.
        slots: `window` byte regions (memoryview, uint8 tensor) of the largest record's size.
        _ring: entries in flight or complete, in cycle order; each holds a distinct slot.
        _current: the entry the forward is computing on (its slot is held), or None.
        _free: slots neither in _ring nor held by _current.
        _next: the position the next refill reads (cycle order, mod S).
        _built: segment objects over (slot, position), at most window * S of them.
        len(_ring) + len(_free) + (_current is not None) == window.
    """

    def __init__(self, io, fd: int, records: list, slots: list[tuple[memoryview, torch.Tensor]],
                 build: Callable[[object, torch.Tensor], object]) -> None:
        assert records and slots
        self.io = io
        self.fd = fd
        self.records = records
        self.slots = slots
        self.build = build
        self._ring: deque[_Entry] = deque()
        self._current: _Entry | None = None
        self._free = list(range(len(slots)))
        self._next = 0
        self._built: dict[tuple[int, int], object] = {}   # (slot, pos) -> segment over that slot
        self.stall_s = [0.0] * len(records)      # time waited for each record, cumulative
        self.read_bytes = 0                      # bytes read (complete), cumulative

    def _fill(self) -> None:
        while self._free:
            slot = self._free.pop()
            rec = self.records[self._next]
            view = self.slots[slot][0][:rec.padded]
            req = self.io.submit_read(self.fd, rec.offset, view, priority=Priority.WEIGHT_PREFETCH)
            self._ring.append(_Entry(self._next, slot, req))
            self._next = (self._next + 1) % len(self.records)

    def _discard(self, entry: _Entry) -> None:
        try:
            self.io.wait(entry.request, promote=False)
        except IOSchedError:
            pass
        self._free.append(entry.slot)

    def release(self) -> None:
        """The forward is done with the segment it was last given."""
        if self._current is not None:
            self._free.append(self._current.slot)
            self._current = None

    def get(self, pos: int, landed: Callable[[], None] | None = None):
        """Segment `pos` (a Segment built over its slot), waiting for its read if needed.
        `landed` is called once the read is complete, before the segment is expanded (the
        caller's end of the stall). Valid until the next get() or release()."""
        self.release()
        if all(e.pos != pos for e in self._ring):
            self.reset(pos)
        self._fill()
        while self._ring[0].pos != pos:
            self._discard(self._ring.popleft())
        entry = self._ring.popleft()
        t0 = time.perf_counter()
        try:
            try:
                self.io.wait(entry.request, promote=True)
            except IOSchedError:
                # a prefetch may have failed long before it was needed (the device has come
                # back since): read it again, now, before failing the step
                rec = self.records[pos]
                self.io.read(self.fd, rec.offset, self.slots[entry.slot][0][:rec.padded],
                             priority=Priority.WEIGHT_READ)
        except IOSchedError as e:
            self._free.append(entry.slot)
            self.reset(pos)
            raise WeightReadError(f"reading weights {self.records[pos].name} failed: {e}; this "
                                  f"step's requests fail, the next step reads again") from None
        self.stall_s[pos] += time.perf_counter() - t0
        self.read_bytes += self.records[pos].padded
        self._current = entry
        self._fill()
        if landed is not None:
            landed()
        self.records[pos].expand(self.slots[entry.slot][1])
        key = (entry.slot, pos)
        segment = self._built.get(key)
        if segment is None:   # views over a slot stay valid: build each (slot, segment) once
            segment = self._built[key] = self.build(self.records[pos], self.slots[entry.slot][1])
        return segment

    def reset(self, pos: int = 0) -> None:
        """Drain everything in flight; the cycle restarts at `pos`."""
        self.release()
        while self._ring:
            self._discard(self._ring.popleft())
        self._next = pos % len(self.records)

    def close(self) -> None:
        self.reset()
