"""Counters from /proc: what `kvmm trace` reports when BPF is not available.

Per process (summed over its threads where the kernel keeps them per thread):
  /proc/PID/io        rchar, wchar, syscr, syscw (read/write-family syscalls), read_bytes,
                      write_bytes (bytes that reached the block layer)
  /proc/PID/stat      minflt, majflt, utime, stime (clock ticks -> ms), num_threads,
                      delayacct_blkio_ticks (time blocked on block I/O; 0 unless the kernel
                      accounts delays: sysctl kernel.task_delayacct=1)
  /proc/PID/task/*/status     voluntary / nonvoluntary context switches
  /proc/PID/task/*/schedstat  time on CPU and waiting on a run queue (ns)
System-wide: /proc/vmstat pgfault, pgmajfault, pgpgin/pgpgout (KiB), pswpin/pswpout.

Prior art: psutil's Linux backend (the same files), pidstat -d -w -r. Left out: syscall
counts by type, block latency, off-CPU time by cause (only BPF sees those); threads that
exited between two samples take their context-switch and schedstat counts with them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

IO_FIELDS = ("rchar", "wchar", "syscr", "syscw", "read_bytes", "write_bytes")
# /proc/PID/stat field numbers (1-based, man 5 proc) of the values kept.
STAT_FIELDS = {"minflt": 10, "majflt": 12, "utime_ticks": 14, "stime_ticks": 15, "num_threads": 20,
               "blkio_ticks": 42}
VMSTAT_FIELDS = ("pgfault", "pgmajfault", "pgpgin", "pgpgout", "pswpin", "pswpout")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PER_THREAD = ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches", "run_ns", "runqueue_wait_ns")


def parse_io(text: str) -> dict[str, int]:
    """/proc/PID/io ("rchar: 123" lines) -> the IO_FIELDS present."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in IO_FIELDS:
            out[key.strip()] = int(value)
    return out


def parse_stat(text: str) -> dict[str, int]:
    """/proc/PID/stat -> STAT_FIELDS (comm may hold spaces and parentheses)."""
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state)
    return {name: int(rest[num - 3]) for name, num in STAT_FIELDS.items() if num - 3 < len(rest)}


def parse_status_switches(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            out[key] = int(value)
    return out


def parse_schedstat(text: str) -> dict[str, int]:
    """/proc/PID/schedstat "run_ns wait_ns timeslices" -> {run_ns, runqueue_wait_ns}."""
    run_ns, wait_ns, _ = text.split()
    return {"run_ns": int(run_ns), "runqueue_wait_ns": int(wait_ns)}


def parse_vmstat(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in VMSTAT_FIELDS:
            out[key] = int(value)
    return out


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One read of a process's /proc counters and of /proc/vmstat (all cumulative).

    Attributes:
      pid: the process read.
      process: counter name -> value; keys from IO_FIELDS, STAT_FIELDS, the switch counts and
        the schedstat times. A file that could not be read leaves its keys out.
      system: VMSTAT_FIELDS -> value.
      unreadable: files that could not be read, with the reason (e.g. io without ptrace rights).
    """
    pid: int
    process: dict[str, int]
    system: dict[str, int]
    unreadable: tuple[str, ...] = ()


def read_sample(pid: int) -> ProcSample:
    """Read `pid`'s counters; ProcessLookupError when the process is gone."""
    base = f"/proc/{pid}"
    process: dict[str, int] = {}
    unreadable: list[str] = []
    try:
        process.update(parse_stat(_read(f"{base}/stat")))
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} has exited") from None
    try:
        process.update(parse_io(_read(f"{base}/io")))
    except OSError as exc:
        unreadable.append(f"{base}/io: {exc.strerror}")
    switches = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    sched = {"run_ns": 0, "runqueue_wait_ns": 0}
    try:
        tids = os.listdir(f"{base}/task")
    except OSError:
        tids = []
    for tid in tids:
        try:
            for k, v in parse_status_switches(_read(f"{base}/task/{tid}/status")).items():
                switches[k] += v
            for k, v in parse_schedstat(_read(f"{base}/task/{tid}/schedstat")).items():
                sched[k] += v
        except (OSError, ValueError):
            continue  # the thread exited while being read
    if tids:
        process.update(switches)
        process.update(sched)
    try:
        system = parse_vmstat(_read("/proc/vmstat"))
    except OSError:
        system = {}
    return ProcSample(pid, process, system, tuple(unreadable))


def sample_delta(prev: ProcSample, cur: ProcSample) -> dict:
    """The report section of one interval: {"process": {...}, "system": {...}}.

    Clock ticks and nanoseconds become milliseconds (`*_ms` keys); counters read in only one
    of the samples are left out.
    """
    if prev.pid != cur.pid:
        raise ValueError(f"samples of different processes ({prev.pid}, {cur.pid})")
    proc = {}
    for key, value in cur.process.items():
        if key not in prev.process or key == "num_threads":
            continue
        d = value - prev.process[key]
        if key in PER_THREAD:
            d = max(d, 0)  # summed over live threads: one that exited takes its share along
        if key.endswith("_ticks"):
            proc[key[:-6] + "_ms"] = round(d * 1000 / CLK_TCK, 3)
        elif key.endswith("_ns"):
            proc[key[:-3] + "_ms"] = round(d / 1e6, 3)
        else:
            proc[key] = d
    if "num_threads" in cur.process:
        proc["threads"] = cur.process["num_threads"]
    system = {k: v - prev.system[k] for k, v in cur.system.items() if k in prev.system}
    return {"process": proc, "system": system}
