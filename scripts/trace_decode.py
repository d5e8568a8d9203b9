"""Transitions per decoded token of a running daemon: `kvmm trace` and bcc's syscount side by side.

Both tracers attach to the daemon first; then N clients (threads of this process, one
connection each) stream `--requests` greedy generations of `--max-tokens` tokens each
(ignore_eos, so every request decodes exactly that many); 1.5 s after the last reply both
tracers get SIGINT (kvmm trace reports 0.5 s intervals and prints those ended; syscount
prints its table). Both windows hold the whole workload (and a little idle time on each
side), so their counts are of the same work: per decoded token = count / tokens the clients
received. Prints one JSON object: kvmm trace's intervals summed, syscount's table, the
clients' tokens and decode tok/s.

Usage (the daemon already serving on SOCKET, pid PID):
  .venv/bin/python scripts/trace_decode.py --socket SOCKET --pid PID --clients 1 --requests 2
Not a test: a measurement (docs/trace.md has the figures and the exact commands).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from kvmm_daemon.client import Client

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def stream_requests(socket: str, n: int, max_tokens: int, out: list, start: threading.Barrier) -> None:
    """`n` streamed greedy requests one after another; appends (tokens, decode seconds) each."""
    with Client(socket) as c:
        start.wait()
        for _ in range(n):
            t_first = None
            tokens = 0
            with c.stream(PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True) as s:
                for d in s:
                    if t_first is None:
                        t_first = time.perf_counter()
                    tokens += len(d.token_ids)
            out.append((tokens, time.perf_counter() - t_first, s.result.usage["completion_tokens"]))


def wait_line(stream, pattern: str, sink: list) -> None:
    for line in stream:
        sink.append(line)
        if re.search(pattern, line):
            return
    raise RuntimeError(f"tracer ended before {pattern!r}: {''.join(sink)[-2000:]}")


def tracer(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # SIGINT back to its default: a background job inherits it ignored, and the tracers end on it
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if argv[0].endswith("bpfcc")
                            else subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def parse_syscount(text: str) -> dict[str, int]:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)\s*$", line)
        if m and m.group(1) != "SYSCALL":
            rows[m.group(1)] = int(m.group(2))
    return rows


def summed(intervals: list[dict]) -> dict:
    """The figures of several `kvmm trace --json` intervals added up."""
    by: dict[str, int] = {}
    out = {"intervals": len(intervals), "interval_s": round(sum(d["interval_s"] for d in intervals), 3),
           "futex": {"waits": 0, "wakes": 0, "woken": 0}, "switches": 0, "offcpu_ms": 0.0, "faults": 0,
           "tokens_daemon": sum(d["tokens"] or 0 for d in intervals)}
    for d in intervals:
        for r in d["syscalls"]["by_syscall"]:
            by[r["name"]] = by.get(r["name"], 0) + r["count"]
        for k in out["futex"]:
            out["futex"][k] += d["syscalls"]["futex"][k]
        out["switches"] += d["offcpu"]["switches"]
        out["offcpu_ms"] += d["offcpu"]["time_ms"]
        out["faults"] += d["faults"]["user"]
    out["by_syscall"] = dict(sorted(by.items(), key=lambda kv: -kv[1]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests", type=int, default=1, help="requests per client, back to back")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--kvmm", default=f"{sys.executable} -m kvmm_daemon.cli", help="how to run kvmm")
    args = ap.parse_args()

    # --socket of no daemon: kvmm trace then asks the daemon nothing per interval (under load a
    # stats call can take seconds, and the interval cut by SIGINT would be long); tokens are
    # the clients' count here
    kvmm = tracer([*args.kvmm.split(), "trace", "-p", str(args.pid), "--socket", "/nonexistent/kvmm.sock",
                   "--json", "-i", "0.5", "--no-hist"])
    sysc = tracer(["/usr/sbin/syscount-bpfcc", "-p", str(args.pid), "-T", "400"])
    k_err, s_out, k_lines = [], [], []
    wait_line(kvmm.stderr, r"tracing pid", k_err)
    wait_line(sysc.stdout, r"Tracing syscalls", s_out)
    # read kvmm trace's lines as they come: a full pipe would block it mid-trace
    reader = threading.Thread(target=lambda: k_lines.extend(kvmm.stdout), daemon=True)
    reader.start()

    results: list = []
    start = threading.Barrier(args.clients + 1)
    threads = [threading.Thread(target=stream_requests, args=(args.socket, args.requests, args.max_tokens,
                                                              results, start)) for _ in range(args.clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(1.5)
    for p in (kvmm, sysc):
        p.send_signal(signal.SIGINT)
    kvmm.wait()
    reader.join()
    s_rest, _ = sysc.communicate()
    interval = summed([json.loads(line) for line in k_lines if line.strip()])
    sc = parse_syscount("".join(s_out) + s_rest)
    tokens = sum(r[2] for r in results)
    per_client = [r[0] / r[1] for r in results if r[1] > 0 and r[0] > 1]
    kc = interval["by_syscall"]
    per = lambda v: round(v / tokens, 3)
    print(json.dumps({
        "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
        "decoded_tokens": tokens, "workload_s": round(wall, 3),
        "aggregate_tok_s": round(tokens / wall, 2),
        "per_stream_tok_s": round(sum(per_client) / len(per_client), 2) if per_client else None,
        "kvmm_trace": interval, "syscount": sc,
        "syscalls_per_token": {"kvmm_trace": per(sum(kc.values())), "syscount": per(sum(sc.values()))},
        "per_token": {"syscalls": per(sum(kc.values())), "by_syscall": {k: per(v) for k, v in kc.items()},
                      "futex_wakes": per(interval["futex"]["wakes"]), "futex_woken": per(interval["futex"]["woken"]),
                      "switches": per(interval["switches"]), "offcpu_ms": per(interval["offcpu_ms"]),
                      "faults": per(interval["faults"])},
        "loadavg": os.getloadavg(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
