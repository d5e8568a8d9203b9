"""StepTrace: where each step's time went, segment by segment (compute vs waiting for flash).

The weight pool stamps the moment the forward asks for a segment and the moment it has it:
the gap is the segment's *stall* (waiting for its read); the time from having one segment to
asking for the next is the *compute* of the one held. A step starts at `begin_step` (the
embedding lookup) and its last segment's compute ends at the next step's start. The last
`keep` steps are kept (a ring), for `kvmm stats` and `kvmm trace` (the daemon's `steps` op),
which puts them beside the block layer's latency of the same reads. Readers in other threads
take `snapshot()`: a tuple copied from the deque in one C call under the GIL, so it never
sees a record half appended.

Invariants: `_stall[i]`/`_compute[i]` are segment i's figures in the step being recorded;
`_held` is the index of the segment the forward holds (-1 before the first of a step).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepRecord:
    started: float                  # time.monotonic() at the step's start
    step_s: float
    bytes_read: int
    stall_s: tuple[float, ...]      # per segment, step order
    compute_s: tuple[float, ...]

    def as_dict(self) -> dict:
        return {"started": self.started, "step_s": round(self.step_s, 6), "bytes_read": self.bytes_read,
                "stall_s": [round(x, 6) for x in self.stall_s],
                "compute_s": [round(x, 6) for x in self.compute_s]}


class StepTrace:
    def __init__(self, num_segments: int, keep: int = 256) -> None:
        self.n = num_segments
        self.steps: deque[StepRecord] = deque(maxlen=keep)
        self._stall = [0.0] * num_segments
        self._compute = [0.0] * num_segments
        self._held = -1
        self._t_held = 0.0
        self._t_start: float | None = None
        self._wall_start = 0.0
        self._bytes_at_start = 0

    def begin_step(self, bytes_read_total: int) -> None:
        now = time.perf_counter()
        if self._t_start is not None:
            self._close_held(now)
            self.steps.append(StepRecord(self._wall_start, now - self._t_start,
                                         bytes_read_total - self._bytes_at_start,
                                         tuple(self._stall), tuple(self._compute)))
            self._stall = [0.0] * self.n
            self._compute = [0.0] * self.n
        self._t_start, self._wall_start = now, time.monotonic()
        self._bytes_at_start = bytes_read_total
        self._held = -1

    def _close_held(self, now: float) -> None:
        if self._held >= 0:
            self._compute[self._held] += now - self._t_held
            self._held = -1

    def asked(self) -> float:
        """The forward asks for a segment: what it held is computed. Returns the stamp."""
        now = time.perf_counter()
        self._close_held(now)
        return now

    def got(self, index: int, t_asked: float | None) -> None:
        """The forward has segment `index`; t_asked None: it was in memory (no stall)."""
        now = time.perf_counter()
        if t_asked is not None:
            self._stall[index] += now - t_asked
        self._held, self._t_held = index, now

    def snapshot(self) -> tuple[StepRecord, ...]:
        """The kept steps, oldest first (safe to call from any thread)."""
        return tuple(self.steps)

    def last(self) -> StepRecord | None:
        return self.steps[-1] if self.steps else None
