"""The BPF C text of `kvmm trace`, built from one fragment per probe.

Every probe runs on a kernel *tracepoint* (this kernel family may lack kprobes) and
aggregates in the kernel: log2 histograms, per-CPU counters and per-number hash tables that
user space reads once per interval and differences (the maps are cumulative and never
cleared, so nothing is lost between a read and a clear). Only the target's events count:
`targets` holds the traced thread-group ids, filled from user space and, with
`follow_children`, by `sched_process_fork` in the kernel.

Probes (name: tracepoints; what it aggregates):
  block:    block_rq_issue/complete (+ block_bio_queue to attribute requests a kworker
            issues for the target): issue->complete latency histogram and ios/bytes/ns per
            direction (read, write, other = flush/discard), and the same per file of
            FILE_KINDS (the daemon's weight and swap files) for requests whose sector falls
            in one of the file's extents (`file_ext`, filled from user space by FIEMAP).
  syscalls: raw_syscalls sys_enter/exit: count, total ns and errors per syscall nr; futex
            waits, wakes and threads woken (the wakes' return values).
  offcpu:   sched_switch: off-CPU time of the target's threads by the state they left in
            (preempted = runnable, sleep = S, io = D, uninterruptible, mostly I/O waits),
            histogram and totals, accounted when the thread runs again.
  faults:   exceptions:page_fault_user: user page faults, and how many were writes.
  fuse:     fuse_request_send/end: per opcode, requests the target sent and requests the
            target answered (it is the FUSE server), with latency.
  io_uring: io_uring_submit_req/complete: submissions per opcode and submit->complete ns.

Prior art: bcc tools/biolatency.py (issue->complete with a start map; log2 histograms),
tools/syscount.py (raw_syscalls with a per-thread start map), tools/offcputime.py and
runqlat.py (sched_switch start maps). Left out: stack traces (they need kprobes or perf
buffers and would cost far more per event), and per-device block breakdowns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvmm_daemon.trace import bpf_text as C

# Counters of the per-CPU `totals` array, in index order. The C side gets `#define T_<NAME>`.
BLOCK_OPS = ("read", "write", "other")
OFFCPU_KINDS = ("preempted", "sleep", "io")
# Files whose block requests are attributed (by their extents' sectors, file_extents.py).
FILE_KINDS = ("weights", "swap")
MAX_FILE_EXTENTS = 256
TOTALS: tuple[str, ...] = (
    *(f"block_{op}_{f}" for op in BLOCK_OPS for f in ("ios", "bytes", "ns")),
    *(f"offcpu_{k}_{f}" for k in OFFCPU_KINDS for f in ("count", "ns")),
    "faults_user", "faults_write", "io_uring_submitted", "io_uring_completed",
    "futex_waits", "futex_wakes", "futex_woken",
    *(f"file_{k}_{f}" for k in FILE_KINDS for f in ("ios", "bytes", "ns")),
)
# Kinds of the shared log2 histogram (key {kind, slot}); the C side gets `#define H_<NAME>`.
HISTS: tuple[str, ...] = (*(f"block_{op}" for op in BLOCK_OPS), *(f"offcpu_{k}" for k in OFFCPU_KINDS),
                          *(f"file_{k}" for k in FILE_KINDS))
# Roles of the FUSE table key.
FUSE_ROLES = ("sent", "served")

# The C fragments index these with arithmetic; keep the layout they assume.
assert TOTALS.index("block_write_ios") == TOTALS.index("block_read_ios") + 3
assert TOTALS.index("offcpu_io_ns") == TOTALS.index("offcpu_preempted_count") + 2 * 2 + 1
assert HISTS.index("block_other") == HISTS.index("block_read") + 2
assert TOTALS.index("file_swap_ios") == TOTALS.index("file_weights_ios") + 3
assert HISTS.index("file_swap") == HISTS.index("file_weights") + 1


@dataclass(frozen=True, slots=True)
class Probe:
    """One probe: the tracepoints it needs ("category:event") and those it can do without."""
    name: str
    summary: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


PROBES: dict[str, Probe] = {p.name: p for p in (
    Probe("block", "block I/O issue->complete latency and bytes",
          ("block:block_rq_issue", "block:block_rq_complete"), ("block:block_bio_queue",)),
    Probe("syscalls", "system calls by number: count, time in kernel, errors",
          ("raw_syscalls:sys_enter", "raw_syscalls:sys_exit")),
    Probe("offcpu", "off-CPU time by state (preempted, sleep, io wait)", ("sched:sched_switch",)),
    Probe("faults", "user page faults", ("exceptions:page_fault_user",)),
    Probe("fuse", "FUSE requests sent and served, per opcode", ("fuse:fuse_request_send", "fuse:fuse_request_end")),
    Probe("io_uring", "io_uring submissions and completions, per opcode",
          ("io_uring:io_uring_submit_req", "io_uring:io_uring_complete")),
)}
CHILDREN_TRACEPOINTS = ("sched:sched_process_fork", "sched:sched_process_exit")


def _defines() -> str:
    from kvmm_daemon.trace.names import syscall_nr
    lines = [f"#define T_{name.upper()} {i}" for i, name in enumerate(TOTALS)]
    lines.append(f"#define N_TOTALS {len(TOTALS)}")
    lines += [f"#define H_{name.upper()} {i}" for i, name in enumerate(HISTS)]
    lines += [f"#define N_FILE_KINDS {len(FILE_KINDS)}", f"#define MAX_FILE_EXTENTS {MAX_FILE_EXTENTS}",
              f"#define FUTEX_NR {syscall_nr('futex') if syscall_nr('futex') is not None else -1}"]
    return "\n".join(lines)


def parse_probe_list(text: str) -> list[str]:
    """"block,offcpu" -> ["block", "offcpu"] in PROBES order; "all" -> every probe."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(PROBES)
    unknown = [n for n in names if n not in PROBES]
    if unknown or not names:
        raise ValueError(f"unknown probe {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(PROBES)} or all")
    return [n for n in PROBES if n in names]


def build_program(probes: Sequence[str], *, follow_children: bool = False, bio_queue: bool = True) -> str:
    """The C text for `probes` (names of PROBES).

    follow_children: add forked children (and new threads) of a target to `targets`.
    bio_queue: attribute block requests by the bio the target queued (needs the
      block:block_bio_queue tracepoint); without it only requests the target's own threads
      issue are counted, and those a kworker or another CPU issues for it are missed.
    """
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    parts = [C.HEADER % {"defines": _defines()}]
    if follow_children:
        parts.append(C.CHILDREN)
    for name in PROBES:
        if name not in probes:
            continue
        if name == "block":
            if bio_queue:
                parts.append(C.BIO_QUEUE)
            parts.append(C.BLOCK % {"bio_owner_check": C.BIO_OWNER_CHECK if bio_queue else ""})
        else:
            parts.append(C.FRAGMENTS[name])
    return "\n".join(part.strip("\n") + "\n" for part in parts)
