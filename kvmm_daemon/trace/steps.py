"""The daemon's own step trace, per interval: compute and I/O-wait time per step and per layer.

While weights stream (`kvmm serve --weight-budget` below the model) the weight pool stamps,
for every step, each segment's (layer's) stall, waiting for its read, and compute
(model/step_trace.py) and keeps the last 256 steps; the daemon serves them with the `steps`
op. Once per interval `StepSource` fetches them and keeps the steps begun since its last
read. `section` sums them into the interval's `steps` section (means per step, per segment)
beside the block probe's latency of the same files, and keeps each step's record for the
timeline. Step times are the daemon's time.monotonic(), the clock the tracer's intervals
use, so `t_s` (seconds since tracing began) places them on the same axis.

Left out: steps that fell out of the daemon's ring between two reads are counted
(`missed`), not recovered; shorten the interval when that happens.
"""
from __future__ import annotations

from kvmm_daemon.trace.daemon_query import DaemonQuery


class StepSource(DaemonQuery):
    """Reads the daemon's step trace (see DaemonQuery for `error` and its invariant).

    Attributes:
      files: {"weights": path | None, "swap": path | None} from the first reply.
      _last: `started` of the newest step already reported (-inf before the first read).
      _total: the daemon's step count at the last read.
    """

    def __init__(self, socket: str | None, *, timeout: float = 2.0):
        super().__init__(socket, "steps", "per-layer compute and I/O wait", timeout=timeout)
        self.files: dict[str, str | None] = {}
        self._last = float("-inf")
        self._total: int | None = None

    def start(self) -> None:
        """Mark what the daemon has now as seen; learn its files."""
        reply = self.call()
        if reply is None:
            return
        self.files = dict(reply.get("files") or {})
        self._total = reply["steps_total"]
        self._last = max((s["started"] for s in reply["steps"]), default=float("-inf"))

    def read(self, t0: float) -> dict | None:
        """The steps begun since the last read as a section (`t0`: the tracer's start on the
        monotonic clock), or None when the trace cannot be read."""
        reply = self.call()
        if reply is None:
            return None
        new = [s for s in reply["steps"] if s["started"] > self._last]
        if new:
            self._last = new[-1]["started"]
        total = reply["steps_total"]
        ran = total - self._total if self._total is not None and total >= self._total else len(new)
        self._total = total
        return section(reply, new, ran, t0)


def section(reply: dict, new: list[dict], ran: int, t0: float) -> dict:
    """The interval's `steps` section: `new` step records (the `steps` reply's form), `ran`
    steps the daemon took in the interval."""
    names = reply["segments"]
    n = len(new)
    out: dict = {"available": reply["available"], "reason": reply["reason"], "steps": n,
                 "steps_run": ran, "missed": max(0, ran - n) if reply["available"] else 0}
    if not n:
        return out
    mean_ms = lambda total: round(total * 1000 / n, 3)
    stall = [sum(s["stall_s"][i] for s in new) for i in range(len(names))]
    compute = [sum(s["compute_s"][i] for s in new) for i in range(len(names))]
    out.update(step_ms=mean_ms(sum(s["step_s"] for s in new)), compute_ms=mean_ms(sum(compute)),
               stall_ms=mean_ms(sum(stall)), bytes_read=sum(s["bytes_read"] for s in new),
               segments=[{"name": name, "compute_ms": mean_ms(c), "stall_ms": mean_ms(w)}
                         for name, c, w in zip(names, compute, stall)],
               records=[{"t_s": round(s["started"] - t0, 6), "step_s": s["step_s"], "bytes_read": s["bytes_read"],
                         "stall_s": s["stall_s"], "compute_s": s["compute_s"]} for s in new])
    return out
