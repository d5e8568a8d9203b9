"""A Chrome trace-event JSON timeline of the intervals, which ui.perfetto.dev opens.

Format (the Trace Event Format that Chrome's about:tracing and Perfetto's JSON importer
read): `{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}` with
  "M" metadata events naming the process track,
  "C" counter events, one per counter and interval, stamped at the interval's start with the
      interval's rate, so each step of the counter track covers its interval; a last sample
      of zeros closes the final step,
  "X" complete events, one slice per interval on an "intervals" thread, whose args carry the
      interval's headline figures (click a slice in the UI to read them), and, from the
      daemon's step trace, one slice per engine step on a "engine steps" thread with a child
      slice per segment (layer): "io wait" while the forward waited for its read, then its
      compute. The daemon stamps a step's segments as durations only, so the children are
      laid end to end from the step's start (time between segments, e.g. the embedding and
      the sampler, is at the step's end).
Timestamps are microseconds since tracing began. Prior art: Chrome's trace_event_format doc;
Perfetto's json_trace_parser (counters are "C" events with numeric args).

Left out: per-event slices (the probes aggregate in the kernel, so there are no events to
draw, only per-interval rates) and the protobuf format.
"""
from __future__ import annotations

import json
import os

TRACK_TID = 1
STEPS_TID = 2


def counters(d: dict) -> dict[str, dict[str, float]]:
    """Counter name -> {series: value per second (or ms per second)} for one interval dict."""
    dt = d["interval_s"] or 1e-9
    rate = lambda v: round(v / dt, 3)
    c: dict[str, dict[str, float]] = {}
    if "syscalls" in d:
        c["syscalls/s"] = {"count": rate(d["syscalls"]["count"])}
        c["syscall time (ms/s)"] = {"in kernel": rate(d["syscalls"]["time_ms"])}
    if "block" in d:
        b = d["block"]
        c["block I/O (MiB/s)"] = {op: rate(b[op]["bytes"] / 2**20) for op in ("read", "write")}
        c["block ios/s"] = {op: rate(b[op]["ios"]) for op in ("read", "write", "other")}
    if "offcpu" in d:
        o = d["offcpu"]
        c["off-CPU (ms/s)"] = {k: rate(o[k]["time_ms"]) for k in ("io", "sleep", "preempted")}
    if "faults" in d:
        c["page faults/s"] = {"user": rate(d["faults"]["user"]), "write": rate(d["faults"]["write"])}
    if "io_uring" in d:
        c["io_uring/s"] = {"submitted": rate(d["io_uring"]["submitted"]),
                           "completed": rate(d["io_uring"]["completed"])}
    if "fuse" in d:
        c["fuse requests/s"] = {role: rate(sum(r["count"] for r in rows)) for role, rows in d["fuse"].items()}
    if "process" in d:
        p = d["process"]
        pick = lambda *keys: {k: rate(p[k]) for k in keys if k in p}
        c["disk I/O (MiB/s)"] = {k: rate(p[k] / 2**20) for k in ("read_bytes", "write_bytes") if k in p}
        c["read/write syscalls/s"] = pick("syscr", "syscw")
        c["context switches/s"] = pick("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
        c["CPU (ms/s)"] = pick("utime_ms", "stime_ms", "runqueue_wait_ms")
        c["page faults/s"] = pick("minflt", "majflt")
    if d.get("tokens") is not None:
        c["tokens/s"] = {"tokens": rate(d["tokens"])}
    if "block" in d and d["block"].get("files"):
        files = d["block"]["files"]
        c["file block I/O (MiB/s)"] = {k: rate(f["bytes"] / 2**20) for k, f in files.items()}
        c["file block latency (mean us)"] = {k: round(f["time_ms"] * 1000 / f["ios"], 1) if f["ios"] else 0
                                             for k, f in files.items()}
    st = d.get("steps")
    if st and st.get("steps"):
        c["step time (ms/step)"] = {"compute": st["compute_ms"], "io wait": st["stall_ms"]}
    return {name: series for name, series in c.items() if series}


def headline(d: dict) -> dict:
    """The args of an interval's slice: a few totals and the top syscalls."""
    h: dict = {"interval_s": d["interval_s"], "tokens": d.get("tokens")}
    if "syscalls" in d:
        h["syscalls"] = d["syscalls"]["count"]
        h["top_syscalls"] = {r["name"]: r["count"] for r in d["syscalls"]["by_syscall"][:5]}
    if "block" in d:
        h["block_read_bytes"] = d["block"]["read"]["bytes"]
        h["block_read_p99_us_le"] = d["block"]["read"]["latency_us"]["p99_le"]
    if "offcpu" in d:
        h["io_wait_ms"] = d["offcpu"]["io"]["time_ms"]
    if d.get("per_token"):
        h["per_token"] = {k: v for k, v in d["per_token"].items() if k != "by_syscall"}
    if d.get("steps", {}).get("steps"):
        st = d["steps"]
        h["steps"] = {k: st[k] for k in ("steps", "missed", "step_ms", "compute_ms", "stall_ms")}
    return h


def step_events(d: dict, pid: int) -> list[dict]:
    """Slices of the interval's traced engine steps: a step, and its segments' io wait and compute."""
    st = d.get("steps") or {}
    names = [r["name"] for r in st.get("segments", [])]
    events = []
    for rec in st.get("records", []):
        t = rec["t_s"] * 1e6
        events.append({"ph": "X", "name": "step", "cat": "kvmm.step", "pid": pid, "tid": STEPS_TID,
                       "ts": round(t, 1), "dur": round(rec["step_s"] * 1e6, 1),
                       "args": {"bytes_read": rec["bytes_read"], "io_wait_ms": round(sum(rec["stall_s"]) * 1e3, 3),
                                "compute_ms": round(sum(rec["compute_s"]) * 1e3, 3)}})
        for name, wait, comp in zip(names, rec["stall_s"], rec["compute_s"]):
            if wait > 0:
                events.append({"ph": "X", "name": f"io wait {name}", "cat": "kvmm.stall", "pid": pid,
                               "tid": STEPS_TID, "ts": round(t, 1), "dur": round(wait * 1e6, 1)})
                t += wait * 1e6
            if comp > 0:
                events.append({"ph": "X", "name": name, "cat": "kvmm.compute", "pid": pid, "tid": STEPS_TID,
                               "ts": round(t, 1), "dur": round(comp * 1e6, 1)})
                t += comp * 1e6
    return events


def build_trace(intervals: list[dict], *, pid: int, label: str, other: dict | None = None) -> dict:
    """The whole trace-event JSON object for `intervals` (in order) of process `pid`."""
    events: list[dict] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": TRACK_TID, "args": {"name": "intervals"}},
    ]
    if any(d.get("steps", {}).get("records") for d in intervals):
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": STEPS_TID,
                       "args": {"name": "engine steps (daemon step trace)"}})
    last_end, names = 0.0, set()
    for d in intervals:
        start_us = round((d["t_s"] - d["interval_s"]) * 1e6)
        dur_us = round(d["interval_s"] * 1e6)
        assert start_us >= last_end - 2, "intervals out of order"  # dicts keep times to 1 us
        last_end = start_us + dur_us
        events.append({"ph": "X", "name": f"interval {d['index']}", "cat": "kvmm", "pid": pid,
                       "tid": TRACK_TID, "ts": start_us, "dur": dur_us, "args": headline(d)})
        events += step_events(d, pid)
        for name, series in counters(d).items():
            names.add((name, tuple(series)))
            events.append({"ph": "C", "name": name, "pid": pid, "ts": start_us, "args": series})
    for name, series in sorted(names):
        events.append({"ph": "C", "name": name, "pid": pid, "ts": round(last_end), "args": dict.fromkeys(series, 0)})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": dict(other or {})}


def write_trace(path: str, trace: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(trace, f, separators=(",", ":"))
    os.replace(tmp, path)
