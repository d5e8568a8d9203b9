"""One interval of `kvmm trace` as a JSON-able dict, and that dict as a text table.

The dict is the contract (`--json` prints one per line, the timeline is drawn from it, the
table is rendered from it, so the three never disagree):

  {"index", "time" (unix s at the end), "t_s" (s since tracing began), "interval_s",
   "source": "bpf" | "procfs", "pids", "tokens" (decoded by the daemon, or null),
   bpf:    "syscalls" (with "futex": waits, wakes, woken), "block" (with "files": the
           daemon's weight and swap files, when attributed), "offcpu", "faults", "fuse",
           "io_uring" (enabled probes only)
   procfs: "process", "system",
   "steps" (the daemon's step trace, steps.py: compute and I/O wait per step and layer),
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
from kvmm_daemon.trace.programs import BLOCK_OPS, FILE_KINDS, FUSE_ROLES, OFFCPU_KINDS


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _ops(stats: dict, name_of) -> list[dict]:
    rows = [{"name": name_of(key), "nr": key, "count": c, "time_us": round(ns / 1e3, 1), "errors": e}
            for key, (c, ns, e) in stats.items()]
    return sorted(rows, key=lambda r: (-r["count"], -r["time_us"], r["name"]))


def _io(d: BpfCounters, total: str, hist: str) -> dict:
    return {"ios": d.total(f"{total}_ios"), "bytes": d.total(f"{total}_bytes"), "time_ms": _ms(d.total(f"{total}_ns")),
            "latency_us": histogram.summary(d.hist(hist))}


def bpf_sections(d: BpfCounters, enabled, files: dict[str, str] | None = None) -> dict:
    """The per-probe sections of one interval from a difference of two map reads; `files`
    (kind -> path) are the files whose block requests the session attributes."""
    out: dict = {}
    if "syscalls" in enabled:
        rows = _ops(d.syscalls, syscall_name)
        out["syscalls"] = {"count": sum(r["count"] for r in rows),
                           "time_ms": round(sum(ns for _, ns, _ in d.syscalls.values()) / 1e6, 3),
                           "errors": sum(r["errors"] for r in rows), "by_syscall": rows,
                           "futex": {k: d.total(f"futex_{k}") for k in ("waits", "wakes", "woken")}}
    if "block" in enabled:
        out["block"] = {op: _io(d, f"block_{op}", f"block_{op}") for op in BLOCK_OPS}
        if files:
            out["block"]["files"] = {k: {"path": files[k], **_io(d, f"file_{k}", f"file_{k}")}
                                     for k in FILE_KINDS if k in files}
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
    """Figures of `sections` divided by the tokens the daemon decoded in the interval."""
    assert tokens > 0
    f: dict = {}
    if "syscalls" in sections:
        f["syscalls"] = sections["syscalls"]["count"]
        f["futex_wakes"] = sections["syscalls"]["futex"]["wakes"]
        f["futex_woken"] = sections["syscalls"]["futex"]["woken"]
    if "offcpu" in sections:
        f["switches"] = sections["offcpu"]["switches"]
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
    out = {k: round(v / tokens, 3) for k, v in f.items()}
    if "syscalls" in sections:
        out["by_syscall"] = {r["name"]: round(r["count"] / tokens, 3) for r in sections["syscalls"]["by_syscall"]}
    return out


def build_interval(*, index: int, t_s: float, interval_s: float, source: str, pids, sections: dict,
                   tokens: int | None, notes=(), now: float | None = None, steps: dict | None = None) -> dict:
    if source not in ("bpf", "procfs"):
        raise ValueError(f"unknown source {source!r}")
    d = {"index": index, "time": round(time.time() if now is None else now, 3), "t_s": round(t_s, 6),
         "interval_s": round(interval_s, 6), "source": source, "pids": sorted(pids), "tokens": tokens,
         **sections}
    if steps is not None:
        d["steps"] = steps
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
        fx = s.get("futex", {})
        lines.append(f"  syscalls      {s['count']}  (in kernel {s['time_ms']:.1f} ms, errors {s['errors']}; futex "
                     f"waits {fx.get('waits', 0)}, wakes {fx.get('wakes', 0)} waking {fx.get('woken', 0)} threads)")
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
        for kind, f in b.get("files", {}).items():
            lat = f["latency_us"]
            lines.append(f"    {kind + ' file':<13} {f['ios']} ios {_size(f['bytes'])}"
                         + (f" (mean {f['time_ms'] * 1000 / f['ios']:.0f} us, p50 <= {lat['p50_le']} us, "
                            f"p99 <= {lat['p99_le']} us)" if f["ios"] else "") + f"  {f['path']}")
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
    if "steps" in d:
        lines += _steps_lines(d["steps"], top)
    if d.get("per_token"):
        pt = d["per_token"]
        lines.append("  per token     " + "  ".join(f"{k} {v:g}" for k, v in pt.items() if k != "by_syscall"))
        if pt.get("by_syscall"):
            lines.append("    by syscall  " + "  ".join(f"{k} {v:g}" for k, v in list(pt["by_syscall"].items())[:top]))
    return "\n".join(lines)


def _steps_lines(st: dict, top: int) -> list[str]:
    """The daemon's step trace: a summary line and one row per segment (layer), slowest first."""
    if not st["available"]:
        return [f"  steps         {st['steps_run']} run; no per-layer trace: {st['reason']}"]
    if not st["steps"]:
        return [f"  steps         {st['steps_run']} run, none traced"]
    lines = [f"  steps         {st['steps']} traced" + (f" ({st['missed']} missed)" if st["missed"] else "")
             + f"  mean {st['step_ms']:.2f} ms: compute {st['compute_ms']:.2f} ms, I/O wait {st['stall_ms']:.2f} ms"
             f"  read {_size(st['bytes_read'] / st['steps'])}/step",
             f"    {'SEGMENT':<20} {'COMPUTE(ms)':>12} {'IO WAIT(ms)':>12}"]
    rows = sorted(st["segments"], key=lambda r: -(r["compute_ms"] + r["stall_ms"]))
    lines += [f"    {r['name']:<20} {r['compute_ms']:>12.3f} {r['stall_ms']:>12.3f}" for r in rows[:top]]
    if len(rows) > top:
        lines.append(f"    ... {len(rows) - top} more")
    return lines
