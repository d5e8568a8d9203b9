"""The interval loop of `kvmm trace`: read a source, difference, yield one report per interval.

A *source* reads cumulative counters (`read()`) and turns two reads into report sections
(`sections(prev, cur)`): `BpfSource` over an attached `probes.BpfSession`, `ProcSource` over
/proc. The loop wakes every 50 ms to notice the target's end, so the last, partial interval
of a command is reported as soon as it exits (its counters are read before it is reaped).
The clock and sleep are parameters so the loop is tested without waiting.

Prior art: bcc tools' `while 1: sleep(interval); print; clear` loop (syscount.py), with
cumulative maps differenced instead of cleared. Left out: aligning intervals to wall-clock
seconds.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from kvmm_daemon.trace import procfs, report
from kvmm_daemon.trace.probes import BpfSession
from kvmm_daemon.trace.steps import StepSource
from kvmm_daemon.trace.tokens import TokenSource, token_delta

POLL_S = 0.05


class BpfSource:
    name = "bpf"

    def __init__(self, session: BpfSession):
        self.session = session

    def read(self):
        return self.session.read()

    def sections(self, prev, cur) -> dict:
        return report.bpf_sections(cur.minus(prev), self.session.selection.enabled, self.session.files)


class ProcSource:
    name = "procfs"

    def __init__(self, pid: int):
        self.pid = pid

    def read(self) -> procfs.ProcSample:
        return procfs.read_sample(self.pid)

    def sections(self, prev, cur) -> dict:
        return procfs.sample_delta(prev, cur)


def run_intervals(source, *, pids: list[int], interval: float, count: int | None,
                  done: Callable[[], bool], tokens: TokenSource | None = None, steps: StepSource | None = None,
                  notes: list[str] | None = None,
                  started: Callable[[], None] | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> Iterator[dict]:
    """Yield interval reports until `count` intervals were reported or `done()` turns true.

    `notes` are attached to the first report (with the token and step sources' errors, if any);
    `steps` (the daemon's step trace) adds a `steps` section to every report;
    `started` is called right after the first read (it releases a gated command).
    """
    if interval <= 0:
        raise ValueError(f"interval {interval} s is not positive")
    if count is not None and count < 1:
        raise ValueError(f"count {count} is below 1")
    prev = source.read()
    tok_prev = tokens.read() if tokens else None
    t0 = t_prev = clock()
    if started is not None:
        started()
    notes = list(notes or ())
    said: set[str] = set()          # source errors already in a report: each is said once
    index = 0
    while count is None or index < count:
        deadline, finished = t_prev + interval, False
        while (now := clock()) < deadline:
            if done():
                finished = True
                break
            sleep(min(POLL_S, deadline - now))
        try:
            cur = source.read()
        except ProcessLookupError:
            return  # the process vanished before its last read (procfs source only)
        now = clock()
        tok_cur = tokens.read() if tokens else None
        step_sec = steps.read(t0) if steps else None
        fresh = [src.error for src in (tokens, steps) if src and src.error and src.error not in said]
        notes += fresh
        said.update(fresh)
        index += 1
        yield report.build_interval(index=index, t_s=now - t0, interval_s=now - t_prev, source=source.name,
                                    pids=pids, sections=source.sections(prev, cur),
                                    tokens=token_delta(tok_prev, tok_cur), notes=notes, steps=step_sec)
        notes = []
        prev, tok_prev, t_prev = cur, tok_cur, now
        if finished or done():
            return
