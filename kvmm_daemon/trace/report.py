"""One interval of `kvmm trace` as a JSON-able dict, and that dict as a text table.

The dict is the contract (`--json` prints one per line, the timeline is drawn from it, the
table is rendered from it, so the three never disagree):

  {"index", "time" (unix s at the end), "t_s" (s since tracing began), "interval_s",
   "source": "bpf" | "procfs", "pids", "tokens" (decoded by the daemon, or null),
   bpf:    "syscalls", "block", "offcpu", "faults", "fuse", "io_uring" (enabled probes only)
   procfs: "process", "system",
   "per_token" (when tokens > 0), "notes" (first interval only)}

Times are milliseconds (`*_ms`) or microseconds (`*_us`); histograms are
`histogram.summary` dicts. Prior art: bcc tools/syscount.py (top-N by count, --json rows)
and biolatency.py (one histogram per interval). Left out: colour, and sorting options other
than by count.
"""
from __future__ import annotations

import time

from kvmm_daemon.trace import histogram
from kvmm_daemon.trace.counters import BpfCounters
from kvmm_daemon.trace.names import fuse_opcode_name, io_uring_opcode_name, syscall_name
from kvmm_daemon.trace.programs import BLOCK_OPS, FUSE_ROLES, OFFCPU_KINDS


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _ops(stats: dict, name_of) -> list[dict]:
    rows = [{"name": name_of(key), "nr": key, "count": c, "time_us": round(ns / 1e3, 1), "errors": e}
            for key, (c, ns, e) in stats.items()]
    return sorted(rows, key=lambda r: (-r["count"], -r["time_us"], r["name"]))


def bpf_sections(d: BpfCounters, enabled) -> dict:
    """The per-probe sections of one interval from a difference of two map reads."""
    out: dict = {}
    if "syscalls" in enabled:
        rows = _ops(d.syscalls, syscall_name)
        out["syscalls"] = {"count": sum(r["count"] for r in rows),
                           "time_ms": round(sum(ns for _, ns, _ in d.syscalls.values()) / 1e6, 3),
                           "errors": sum(r["errors"] for r in rows), "by_syscall": rows}
    if "block" in enabled:
        out["block"] = {op: {"ios": d.total(f"block_{op}_ios"), "bytes": d.total(f"block_{op}_bytes"),
                             "time_ms": _ms(d.total(f"block_{op}_ns")),
                             "latency_us": histogram.summary(d.hist(f"block_{op}"))} for op in BLOCK_OPS}
    if "offcpu" in enabled:
        kinds = {k: {"count": d.total(f"offcpu_{k}_count"), "time_ms": _ms(d.total(f"offcpu_{k}_ns")),
                     "latency_us": histogram.summary(d.hist(f"offcpu_{k}"))} for k in OFFCPU_KINDS}
        out["offcpu"] = {"switches": sum(k["count"] for k in kinds.values()),
                         "time_ms": round(sum(k["time_ms"] for k in kinds.values()), 3), **kinds}
    if "faults" in enabled:
        out["faults"] = {"user": d.total("faults_user"), "write": d.total("faults_write")}
    if "fuse" in enabled:
        out["fuse"] = {role: _ops({op: v for (op, r), v in d.fuse.items() if r == role}, fuse_opcode_name)
                       for role in FUSE_ROLES}
    if "io_uring" in enabled:
        out["io_uring"] = {"submitted": d.total("io_uring_submitted"), "completed": d.total("io_uring_completed"),
                           "by_op": _ops(d.io_uring, io_uring_opcode_name)}
    return out


def per_token(sections: dict, tokens: int) -> dict:
    """Figures of `sections` divided by the tokens the daemon computed in the interval."""
    assert tokens > 0
    f: dict = {}
    if "syscalls" in sections:
        f["syscalls"] = sections["syscalls"]["count"]
    if "faults" in sections:
        f["faults"] = sections["faults"]["user"]
    if "syscalls" in f and "faults" in f:
        f["transitions"] = f["syscalls"] + f["faults"]
    if "block" in sections:
        f["block_read_bytes"] = sections["block"]["read"]["bytes"]
        f["block_ms"] = sum(sections["block"][op]["time_ms"] for op in BLOCK_OPS)
    if "offcpu" in sections:
        f["offcpu_ms"] = sections["offcpu"]["time_ms"]
        f["io_wait_ms"] = sections["offcpu"]["io"]["time_ms"]
    if "process" in sections:
        p = sections["process"]
        for key in ("syscr", "syscw", "read_bytes", "minflt", "majflt", "voluntary_ctxt_switches"):
            if key in p:
                f[key] = p[key]
        if "utime_ms" in p and "stime_ms" in p:
            f["cpu_ms"] = p["utime_ms"] + p["stime_ms"]
    return {k: round(v / tokens, 3) for k, v in f.items()}


def build_interval(*, index: int, t_s: float, interval_s: float, source: str, pids, sections: dict,
                   tokens: int | None, notes=(), now: float | None = None) -> dict:
    if source not in ("bpf", "procfs"):
        raise ValueError(f"unknown source {source!r}")
    d = {"index": index, "time": round(time.time() if now is None else now, 3), "t_s": round(t_s, 6),
         "interval_s": round(interval_s, 6), "source": source, "pids": sorted(pids), "tokens": tokens,
         **sections}
    if tokens:
        d["per_token"] = per_token(sections, tokens)
    if notes:
        d["notes"] = list(notes)
    return d


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _op_table(rows: list[dict], head: str, top: int) -> list[str]:
    lines = [f"    {head:<20} {'COUNT':>9} {'TIME(us)':>12} {'ERRORS':>7}"]
    lines += [f"    {r['name']:<20} {r['count']:>9} {r['time_us']:>12.1f} {r['errors']:>7}" for r in rows[:top]]
    if len(rows) > top:
        lines.append(f"    ... {len(rows) - top} more")
    return lines


def format_interval(d: dict, *, top: int = 10, hists: bool = True) -> str:
    """The interval as text, like the bcc tools print it (notes are the caller's to print)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(d["time"]))
    tok = f"  tokens {d['tokens']}" if d.get("tokens") is not None else ""
    lines = [f"[{stamp}] pids {','.join(map(str, d['pids']))}  interval {d['interval_s']:.2f} s  "
             f"source {d['source']}{tok}"]
    if "syscalls" in d:
        s = d["syscalls"]
        lines.append(f"  syscalls      {s['count']}  (in kernel {s['time_ms']:.1f} ms, errors {s['errors']})")
        if s["by_syscall"]:
            lines += _op_table(s["by_syscall"], "SYSCALL", top)
    if "block" in d:
        b = d["block"]
        parts = [f"{op} {b[op]['ios']} ios {_size(b[op]['bytes'])}"
                 + (f" (mean {b[op]['time_ms'] * 1000 / b[op]['ios']:.0f} us)" if b[op]["ios"] else "")
                 for op in BLOCK_OPS if b[op]["ios"] or op != "other"]
        lines.append("  block I/O     " + "  ".join(parts))
        for op in BLOCK_OPS:
            if hists and b[op]["ios"]:
                h = histogram.from_buckets(b[op]["latency_us"]["buckets"])
                lines.append(histogram.format_log2_hist(h, f"{op} usecs"))
    if "offcpu" in d:
        o = d["offcpu"]
        lines.append(f"  off-CPU       {o['switches']} switches  {o['time_ms']:.1f} ms  (io wait/D {o['io']['time_ms']:.1f} ms, "
                     f"sleep {o['sleep']['time_ms']:.1f} ms, preempted {o['preempted']['time_ms']:.1f} ms)")
        if hists and o["switches"]:
            h = histogram.merge(*(histogram.from_buckets(o[k]["latency_us"]["buckets"]) for k in OFFCPU_KINDS))
            lines.append(histogram.format_log2_hist(h, "off-CPU usecs"))
    if "faults" in d:
        lines.append(f"  page faults   user {d['faults']['user']} (write {d['faults']['write']})")
    if "io_uring" in d:
        u = d["io_uring"]
        lines.append(f"  io_uring      submitted {u['submitted']}  completed {u['completed']}")
        if u["by_op"]:
            lines += _op_table(u["by_op"], "OPCODE", top)
    if "fuse" in d:
        lines.append("  fuse          " + "  ".join(f"{role} {sum(r['count'] for r in d['fuse'][role])}"
                                                  for role in FUSE_ROLES))
        for role in FUSE_ROLES:
            if d["fuse"][role]:
                lines += _op_table(d["fuse"][role], f"{role.upper()} OPCODE", top)
    if "process" in d:
        p, s = d["process"], d["system"]
        g = lambda k: p.get(k, "-")
        lines.append(f"  io            read {_size(p['read_bytes']) if 'read_bytes' in p else '-'} from disk, "
                     f"rchar {g('rchar')}, syscr {g('syscr')}; write {_size(p['write_bytes']) if 'write_bytes' in p else '-'}"
                     f" to disk, wchar {g('wchar')}, syscw {g('syscw')}")
        lines.append(f"  cpu           user {g('utime_ms')} ms  system {g('stime_ms')} ms  run-queue wait "
                     f"{g('runqueue_wait_ms')} ms  blkio delay {g('blkio_ms')} ms  threads {g('threads')}")
        lines.append(f"  switches      voluntary {g('voluntary_ctxt_switches')}  involuntary "
                     f"{g('nonvoluntary_ctxt_switches')}")
        lines.append(f"  page faults   minor {g('minflt')}  major {g('majflt')}")
        lines.append("  system        " + "  ".join(f"{k} {v}" for k, v in s.items()))
    if d.get("per_token"):
        lines.append("  per token     " + "  ".join(f"{k} {v:g}" for k, v in d["per_token"].items()))
    return "\n".join(lines)
