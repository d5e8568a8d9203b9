"""`kvmm trace`: eBPF tracing of I/O stalls and user/kernel transitions of the kvmm daemon.

USAGE: kvmm trace [-h] [-p PID | -- COMMAND...] [--socket PATH] [-i SECONDS] [-c COUNT]
                  [--probes LIST] [--children] [--procfs] [--json] [--perfetto FILE]
                  [--top N] [--no-hist] [--check]

Kernel tracepoints only (no kprobes): block I/O latency (also per daemon weight and swap
file), syscalls by type, futex wake-ups, off-CPU time by cause, user page faults, FUSE
requests and io_uring, aggregated in the kernel and reported per interval (and per token the
daemon decoded, with its per-layer compute and I/O wait, when its socket answers). Without
root, bcc, kernel headers or tracefs it names what is missing and reports /proc counters.

The logic lives in kvmm_daemon/trace/; this module is only the argparse edge (bcc tools'
layout: USAGE, examples in --help, a hidden --ebpf that prints the C text).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys

from kvmm_daemon.errors import KvmmError

EXAMPLES = """examples:
    kvmm trace                        # the running daemon (kvmm serve), 1 s intervals, until Ctrl-C
    kvmm trace -p 1234 -i 5 -c 3      # pid 1234: three 5-second intervals
    kvmm trace --json -c 10           # one JSON object per interval
    kvmm trace --probes block,offcpu  # only block I/O latency and off-CPU time
    kvmm trace --perfetto t.json -- kvmm run 'Name a colour.'
                                      # trace a command; open t.json in ui.perfetto.dev
    kvmm trace --procfs               # /proc counters only, no BPF
    kvmm trace --check                # one line: which probes attach here, why the others cannot
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("trace", help="eBPF tracing of I/O stalls and user/kernel transitions",
                              description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", "--pid", type=int, help="trace this process (default: the process running `kvmm serve`)")
    p.add_argument("--socket", metavar="PATH",
                   help="daemon socket for tokens per interval (default: the traced daemon's --socket, else "
                        "$KVMM_SOCKET or /run/kvmm/kvmm.sock; asked only when tracing the daemon)")
    p.add_argument("-i", "--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds per report (default 1)")
    p.add_argument("-c", "--count", type=int, metavar="COUNT", help="number of reports (default: until the end)")
    p.add_argument("--probes", default="all", metavar="LIST",
                   help="comma-separated: block,syscalls,offcpu,faults,fuse,io_uring (default all)")
    p.add_argument("--children", action="store_true",
                   help="also trace processes the target forks (always on for a COMMAND)")
    p.add_argument("--procfs", action="store_true", help="do not use BPF; report /proc counters")
    p.add_argument("--json", action="store_true", help="print one JSON object per interval")
    p.add_argument("--perfetto", metavar="FILE", help="write a Chrome trace-event JSON timeline for ui.perfetto.dev")
    p.add_argument("--top", type=int, default=10, metavar="N", help="syscalls shown per interval (default 10)")
    p.add_argument("--no-hist", action="store_true", help="omit histograms from the table")
    p.add_argument("--check", action="store_true",
                   help="attach every probe once and say in one line which attach and why the others cannot")
    p.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="run COMMAND and trace it (and its children) until it exits")
    p.set_defaults(func=run)


def _note(msg: str) -> None:
    print(f"kvmm trace: {msg}", file=sys.stderr)


def _check_args(args: argparse.Namespace) -> list[str]:
    from kvmm_daemon.trace.programs import parse_probe_list

    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if args.command and args.pid is not None:
        raise KvmmError("give either --pid or a command after --, not both")
    if args.interval <= 0:
        raise KvmmError(f"--interval {args.interval} is not positive; give seconds, e.g. -i 1")
    if args.count is not None and args.count < 1:
        raise KvmmError(f"--count {args.count} is below 1; give the number of reports, e.g. -c 5")
    try:
        return parse_probe_list(args.probes)
    except ValueError as exc:
        raise KvmmError(f"--probes: {exc}") from None


def _open_bpf(probes: list[str], follow_children: bool, notes: list[str]):
    """A BpfSession, or None with notes saying exactly why BPF is not used."""
    from kvmm_daemon.trace.probes import BpfSession, detect_environment, select_probes, tracepoint_exists

    env = detect_environment()
    notes.extend(env.notes)
    missing = env.missing()
    if missing:
        notes.append("BPF tracing unavailable: " + "; ".join(missing))
        return None
    selection = select_probes(probes, lambda tp: tracepoint_exists(env.tracefs, tp),
                              follow_children=follow_children)
    if not selection.enabled:
        notes.extend(selection.notes)
        notes.append("BPF tracing unavailable: none of the requested probes' tracepoints exist")
        return None
    try:
        session = BpfSession.open(selection)
    except RuntimeError as exc:
        notes.extend(selection.notes)
        notes.append(f"BPF tracing unavailable: {exc}")
        return None
    notes.extend(session.notes)
    return session


def run(args: argparse.Namespace) -> int:
    from kvmm_daemon.trace import perfetto, report, target
    from kvmm_daemon.trace.programs import build_program
    from kvmm_daemon.trace.steps import StepSource
    from kvmm_daemon.trace.tokens import TokenSource
    from kvmm_daemon.trace.tracer import BpfSource, ProcSource, run_intervals

    if args.check:
        from kvmm_daemon.trace.check import check
        ok, line = check()
        print(line)
        return 0 if ok else 1
    probes = _check_args(args)
    follow = args.children or bool(args.command)
    if args.ebpf:
        print(build_program(probes, follow_children=follow))
        return 0

    command = None
    if args.command:
        command = target.GatedCommand(args.command)
        pid = command.pid
        done = command.exited
    else:
        pid = args.pid if args.pid is not None else target.find_daemon()
        target.check_pid(pid)
        done = lambda: not target.alive(pid)
    argv = target.read_cmdline(pid)
    is_daemon = not command and target.is_daemon_cmdline(argv)
    socket = args.socket or (target.daemon_socket(argv) if is_daemon else None)
    tokens = TokenSource(socket) if (socket or is_daemon) else None
    steps = StepSource(socket) if tokens is not None else None
    notes: list[str] = []
    session = None
    intervals: list[dict] = []
    interrupted, completed, status = False, False, 0
    label = target.describe(pid) if not command else " ".join(" ".join(args.command).split())[:80]
    old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # end like Ctrl-C, keeping the results
    try:
        if args.procfs:
            notes.append("--procfs: BPF not used; /proc counters only")
        else:
            session = _open_bpf(probes, follow, notes)
            if session is None:
                notes.append("falling back to /proc counters (no syscall types, block latency or off-CPU time)")
        if steps is not None:
            steps.start()
        if session is not None:
            session.add_target(pid)
            if steps is not None:
                notes.extend(session.set_files(steps.files))
            source = BpfSource(session)
            what = f"probes {', '.join(session.selection.enabled)}"
        else:
            source = ProcSource(pid)
            what = "/proc counters"
            notes.extend(f"cannot read {u}; its counters are left out" for u in source.read().unreadable)
        for n in notes:
            _note(n)
        _note(f"tracing pid {pid} ({label}) with {what}; "
              + ("until it exits" if command else "Ctrl-C to end" if args.count is None else f"{args.count} reports"))
        for d in run_intervals(source, pids=[pid], interval=args.interval, count=args.count, done=done,
                               tokens=tokens, steps=steps, notes=notes,
                               started=command.release if command else None):
            intervals.append(d)
            if args.json:
                print(json.dumps(d), flush=True)
            else:
                print(report.format_interval(d, top=args.top, hists=not args.no_hist) + "\n", flush=True)
        completed = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if session is not None:
            session.close()
        if tokens is not None:
            tokens.close()
        if steps is not None:
            steps.close()
        if args.perfetto and intervals:
            trace = perfetto.build_trace(intervals, pid=pid, label=f"kvmm trace: {label} (pid {pid})",
                                         other={"pids": [pid], "source": intervals[0]["source"],
                                                "command": args.command or None})
            perfetto.write_trace(args.perfetto, trace)
            _note(f"wrote {args.perfetto} ({len(intervals)} intervals); open it in https://ui.perfetto.dev")
        signal.signal(signal.SIGTERM, old_term)
        if command is not None:  # after -c COUNT reports the command runs on to its end
            status = command.wait() if completed and command.released else command.close()
    if command is not None:  # the command's exit status, as time(1) and strace do
        return status if status >= 0 else 128 - status
    return 130 if interrupted else 0
