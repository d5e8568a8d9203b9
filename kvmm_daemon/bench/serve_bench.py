"""`kvmm bench serve`: what the service costs — N concurrent clients through the daemon vs
the same workload driven in-process.

Workload: `--requests` greedy requests (prompts cycled from a fixed list, `--max-tokens`
each, ignore_eos so every request decodes exactly that many tokens), kept `--clients` in
flight at once (a closed loop: a finished request is replaced by the next one).
* in-process: one Engine; the loop adds requests and steps it, timestamping every delta;
* daemon: `kvmm serve` started on the same engine settings (or `--socket` to use a running
  one), `--clients` trio tasks, each with its own connection, streaming.
Never both at once: after one warm-up run each (first-call costs of torch kernels stay out),
`--rounds` measured runs alternate between the sides, so that load from elsewhere on the
machine drifts into both alike; the rounds are pooled.
Figures per side: throughput (completion tokens/s over the wall time), time to first token
(from submission) and inter-token latency (between streamed chunks, spread over their
tokens), p50/p99. Overhead = daemon / in-process.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

PROMPTS = [
    "Explain in one paragraph why the sky is blue.",
    "Write a short poem about a lighthouse keeper.",
    "What are three uses of a paged KV cache in LLM serving?",
    "Summarize the plot of a detective story set in a small harbour town.",
    "List five vegetables that grow well in a cold climate.",
    "How does a bicycle stay upright while moving?",
    "Describe the water cycle to a ten year old.",
    "Give two reasons to write tests before the code.",
]


def register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or safetensors dir (default: embedded SmolLM2-135M)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients / requests in flight (default 8)")
    p.add_argument("--requests", type=int, default=32, help="requests in the workload (default 32)")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request (default 32)")
    p.add_argument("--kv-budget", default="128MiB", help="KV budget of both engines (default 128MiB)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=2, help="alternating measured rounds per side (default 2)")
    p.add_argument("--socket", default=None, help="bench this running daemon instead of starting one")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


class Recorder:
    """Per-request timestamps -> throughput, TTFT and inter-token latency."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tokens = 0
        self.wall_s = 0.0
        self._submitted: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def submitted(self, rid: str) -> None:
        self._submitted[rid] = time.perf_counter()

    def delta(self, rid: str, ntokens: int) -> None:
        if ntokens == 0:
            return
        now = time.perf_counter()
        if rid not in self._last:
            self.ttft.append(now - self._submitted[rid])
            ntokens_after_first = ntokens - 1
        else:
            ntokens_after_first = ntokens
        if ntokens_after_first:
            span = now - self._last.get(rid, now)
            self.itl += [span / ntokens_after_first] * ntokens_after_first
        self._last[rid] = now
        self.tokens += ntokens

    def summary(self, wall_s: float, requests: int) -> dict:
        ms = lambda v: None if v is None else round(v * 1000, 2)
        return {"requests": requests, "completion_tokens": self.tokens, "wall_s": round(wall_s, 3),
                "throughput_tok_s": round(self.tokens / wall_s, 1),
                "ttft_p50_ms": ms(percentile(self.ttft, 50)), "ttft_p99_ms": ms(percentile(self.ttft, 99)),
                "itl_p50_ms": ms(percentile(self.itl, 50)), "itl_p99_ms": ms(percentile(self.itl, 99))}


def _inprocess_engine(args: argparse.Namespace):
    from kvmm_daemon.config import EngineConfig
    from kvmm_daemon.engine.engine import Engine
    from kvmm_daemon.engine.sampling_params import SamplingParams

    engine = Engine.from_config(EngineConfig(model=args.model, kv_budget=args.kv_budget, threads=args.threads))
    prompts = [engine.encode_prompt(text=p) for p in PROMPTS]
    return engine, prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)


def _drive_engine(engine, prompts, params, args: argparse.Namespace, tag: str) -> Recorder:
    """The workload in-process: `clients` requests in flight, replaced as they finish."""
    rec, next_i, in_flight = Recorder(), 0, 0
    t0 = time.perf_counter()
    while next_i < args.requests or in_flight:
        while in_flight < args.clients and next_i < args.requests:
            rid = f"{tag}{next_i}"
            rec.submitted(rid)
            engine.add_request(rid, prompts[next_i % len(prompts)], params)
            next_i += 1
            in_flight += 1
        for out in engine.step():
            rec.delta(out.request_id, sum(len(d.token_ids) for d in out.deltas))
            in_flight -= out.finished
    rec.wall_s = time.perf_counter() - t0
    return rec


async def _drive_daemon(path: str, args: argparse.Namespace) -> Recorder:
    import trio

    from kvmm_daemon.client import AsyncClient

    rec, counter = Recorder(), iter(range(args.requests))

    async def client_task() -> None:
        async with AsyncClient.connect(path) as c:
            for i in counter:
                rid = f"c{i}"
                rec.submitted(rid)
                async with c.stream(PROMPTS[i % len(PROMPTS)], max_tokens=args.max_tokens, ignore_eos=True) as s:
                    async for d in s:
                        rec.delta(rid, len(d.token_ids))

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(args.clients):
            nursery.start_soon(client_task)
    rec.wall_s = time.perf_counter() - t0
    return rec


def _start_daemon(args: argparse.Namespace, directory: str) -> tuple[subprocess.Popen, str]:
    from kvmm_daemon.client import Client, DaemonUnavailable

    path = os.path.join(directory, "bench.sock")
    cmd = [sys.executable, "-m", "kvmm_daemon.cli", "serve", "--socket", path, "--socket-group", "",
           "--kv-budget", str(args.kv_budget), "--log-level", "warning"]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.Popen(cmd, stderr=open(os.path.join(directory, "daemon.log"), "wb"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with Client(path) as c:
                c.health()
            return proc, path
        except DaemonUnavailable:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the bench daemon did not start; see {directory}/daemon.log")


def _measure(args: argparse.Namespace, path: str) -> tuple[dict, dict]:
    """Alternate in-process and daemon runs (after one warm-up each) so that load from
    elsewhere on the machine drifts into both sides alike; pool the rounds."""
    import trio

    engine, prompts, params = _inprocess_engine(args)
    _drive_engine(engine, prompts, params, args, "w")
    trio.run(_drive_daemon, path, args)
    sides: dict[str, list[Recorder]] = {"inprocess": [], "daemon": []}
    for r in range(args.rounds):
        sides["inprocess"].append(_drive_engine(engine, prompts, params, args, f"r{r}-"))
        sides["daemon"].append(trio.run(_drive_daemon, path, args))
    out = []
    for recs in sides.values():
        pooled = Recorder()
        for rec in recs:
            pooled.ttft += rec.ttft
            pooled.itl += rec.itl
            pooled.tokens += rec.tokens
        out.append(pooled.summary(sum(rec.wall_s for rec in recs), args.requests * len(recs)))
    return out[0], out[1]


def run_serve_bench(args: argparse.Namespace) -> dict:
    workload = {"clients": args.clients, "requests": args.requests, "rounds": args.rounds, "max_tokens": args.max_tokens,
                "model": args.model or "embedded SmolLM2-135M", "kv_budget": str(args.kv_budget)}
    if args.socket:
        inproc, daemon = _measure(args, args.socket)
    else:
        with tempfile.TemporaryDirectory(prefix="kvmm-bench-") as d:
            proc, path = _start_daemon(args, d)
            try:
                inproc, daemon = _measure(args, path)
            finally:
                proc.terminate()
                proc.wait(60)
    ratio = lambda a, b: None if not a or not b else round(a / b, 3)
    overhead = {"throughput_ratio": ratio(daemon["throughput_tok_s"], inproc["throughput_tok_s"]),
                "ttft_p50_ratio": ratio(daemon["ttft_p50_ms"], inproc["ttft_p50_ms"]),
                "itl_p50_ratio": ratio(daemon["itl_p50_ms"], inproc["itl_p50_ms"])}
    rows = [("throughput tok/s", "throughput_tok_s"), ("TTFT p50 ms", "ttft_p50_ms"), ("TTFT p99 ms", "ttft_p99_ms"),
            ("ITL p50 ms", "itl_p50_ms"), ("ITL p99 ms", "itl_p99_ms"), ("wall s", "wall_s")]
    print(f"serve bench: {args.requests} requests x {args.max_tokens} tokens, {args.clients} concurrent, "
          f"{args.rounds} rounds per side")
    print(f"{'':18} {'in-process':>12} {'daemon':>12}")
    for label, key in rows:
        print(f"{label:18} {inproc[key]!s:>12} {daemon[key]!s:>12}")
    print(f"daemon/in-process throughput {overhead['throughput_ratio']}, TTFT p50 {overhead['ttft_p50_ratio']}, "
          f"ITL p50 {overhead['itl_p50_ratio']}")
    return {"workload": workload, "inprocess": inproc, "daemon": daemon, "overhead": overhead}
