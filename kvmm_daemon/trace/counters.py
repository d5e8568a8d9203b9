"""Snapshots of the BPF maps as plain data, and the difference of two of them.

The maps of `programs.py` are cumulative; user space reads them into a `BpfCounters` once
per interval and reports `cur.minus(prev)`. Keeping the snapshot free of bcc types means
every step after the read (differences, reports, the timeline) is tested without root.

Left out: the in-flight start maps (rq_start, sys_start, ...): they hold timestamps of
events not finished yet, not results.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvmm_daemon.trace import histogram
from kvmm_daemon.trace.programs import HISTS, TOTALS

OpStats = dict  # key -> (count, ns, errors)


def _minus_ops(cur: OpStats, prev: OpStats) -> OpStats:
    out = {}
    for key, (count, ns, errors) in cur.items():
        pc, pn, pe = prev.get(key, (0, 0, 0))
        if count - pc:
            out[key] = (count - pc, ns - pn, errors - pe)
    assert all(v[0] > 0 and v[1] >= 0 and v[2] >= 0 for v in out.values()), "op counters went backwards"
    return out


@dataclass(frozen=True, slots=True)
class BpfCounters:
    """One read of the maps (or the difference of two reads).

    Attributes:
      totals: every name of programs.TOTALS -> value (absent names read as 0).
      hists: every name of programs.HISTS -> {log2 slot: count}.
      syscalls: syscall nr -> (count, ns, errors).
      fuse: (opcode, role) -> (count, ns, errors); role is "sent" or "served".
      io_uring: opcode -> (count, ns, errors).
    Invariant: in a difference every count is > 0 (empty entries are dropped).
    """
    totals: dict[str, int] = field(default_factory=dict)
    hists: dict[str, dict[int, int]] = field(default_factory=dict)
    syscalls: OpStats = field(default_factory=dict)
    fuse: OpStats = field(default_factory=dict)
    io_uring: OpStats = field(default_factory=dict)

    def __post_init__(self):
        unknown = (set(self.totals) - set(TOTALS)) | (set(self.hists) - set(HISTS))
        if unknown:
            raise ValueError(f"unknown counters {sorted(unknown)}; they must be named in programs.TOTALS/HISTS")

    def total(self, name: str) -> int:
        return self.totals.get(name, 0)

    def hist(self, name: str) -> dict[int, int]:
        return self.hists.get(name, {})

    def minus(self, prev: BpfCounters) -> BpfCounters:
        totals = {n: self.total(n) - prev.total(n) for n in TOTALS}
        assert all(v >= 0 for v in totals.values()), "a cumulative counter went backwards"
        hists = {n: histogram.subtract(self.hist(n), prev.hist(n)) for n in HISTS}
        return BpfCounters(totals=totals, hists={n: h for n, h in hists.items() if h},
                           syscalls=_minus_ops(self.syscalls, prev.syscalls),
                           fuse=_minus_ops(self.fuse, prev.fuse),
                           io_uring=_minus_ops(self.io_uring, prev.io_uring))
