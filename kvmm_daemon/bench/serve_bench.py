"""`kvmm bench serve`: what the service costs — N concurrent clients through the daemon vs
the same workload driven in-process.

Workload, once per `--clients` count (default 1 and 8: most apps hold one stream at a time,
a shared daemon several): `--requests` greedy requests (default 4 per client; prompts cycled
from a fixed list, `--max-tokens` each, ignore_eos so every request decodes exactly that many
tokens), kept that many clients in flight at once (a closed loop: a finished request is
replaced by the next one).
* in-process: one Engine; the loop adds requests and steps it, timestamping every delta;
* daemon: `kvmm serve` started on the same engine settings (or `--socket` to use a running
  one), `--clients` trio tasks, each with its own connection, streaming;
* http (with `--http`): the same daemon's OpenAI-compatible API on its Unix socket,
  `--clients` trio tasks each with a keep-alive connection streaming /v1/chat/completions
  (server-sent events). The client is sse_client.py (h11, one write per request), as lean as
  the msgpack side's AsyncClient: the comparison is of the fronts, not of client libraries
  (httpx, which the openai package uses, cost ~1-3 ms more per request on the client).
Never both at once: after one warm-up run each (first-call costs of torch kernels stay out),
`--rounds` measured runs alternate between the sides, so that load from elsewhere on the
machine drifts into both alike; the rounds are pooled.
Goals: the daemon >= 0.9x in-process throughput, TTFT p50 within +5 ms at one client and
+10 ms at 8; the HTTP front >= 0.9x the msgpack socket, TTFT p50 within +10 ms.
Figures per side: throughput (completion tokens/s over the wall time), time to first token
and inter-token latency (between streamed chunks, spread over their tokens), p50/p99.
Overhead = daemon / in-process. TTFT runs on each side (TTFT_SPANS, also in the JSON):
* in-process: from `Engine.add_request` to the end of the step whose output has the token;
* daemon: from the call that encodes and writes the generate frame to the first delta frame
  with tokens, read and decoded by AsyncClient;
* http: from the call that encodes and writes the POST to the first SSE event with content,
  read, parsed and JSON-decoded by SseClient.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

TTFT_SPANS = {
    "inprocess": "Engine.add_request -> end of the step that output the first token",
    "daemon": "AsyncClient.stream call (encode + write the frame) -> first delta with tokens decoded",
    "http": "SseClient.events call (encode + write the POST) -> first SSE event with content JSON-decoded",
}
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
    p.add_argument("--clients", type=_counts, default=[1, 8],
                   help="concurrent clients (requests in flight), one case per count: e.g. 1,8 (the default)")
    p.add_argument("--requests", type=int, default=None, help="requests per case (default 4 per client)")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request (default 32)")
    p.add_argument("--kv-budget", default="128MiB", help="KV budget of both engines (default 128MiB)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=2, help="alternating measured rounds per side (default 2)")
    p.add_argument("--admit-wait-ms", type=float, default=None,
                   help="the started daemon's --admit-wait-ms (default: the daemon's default)")
    p.add_argument("--socket", default=None, help="bench this running daemon instead of starting one")
    p.add_argument("--http", action="store_true", help="also drive the daemon's OpenAI-compatible HTTP API")
    p.add_argument("--http-socket", default=None, help="with --socket: the running daemon's HTTP socket")


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of client counts") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be >= 1, got {text!r}")
    return counts


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
    from kvmm_daemon.engine_config import EngineConfig
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


async def _run_clients(rec: Recorder, client_task, clients: int) -> Recorder:
    """Run `clients` copies of `client_task` at once; the wall time goes into `rec`."""
    import trio

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client_task)
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

    return await _run_clients(rec, client_task, args.clients)


async def _drive_http(path: str, args: argparse.Namespace) -> Recorder:
    """The workload through the HTTP API: one SseClient connection per client, SSE chat streams.
    A chunk carries the text of one engine step (one token; two when a character spans
    tokens); the final usage chunk corrects the token count."""
    from kvmm_daemon.bench.sse_client import SseClient

    rec, counter = Recorder(), iter(range(args.requests))

    async def client_task() -> None:
        async with SseClient.connect(path) as h:
            model = (await h.get_json("/v1/models"))["data"][0]["id"]
            for i in counter:
                rid, counted = f"h{i}", 0
                body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                        "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                rec.submitted(rid)
                async for chunk in h.events("/v1/chat/completions", body):
                    if "error" in chunk:
                        raise RuntimeError(f"the HTTP API failed request {rid}: {chunk['error']}")
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        rec.delta(rid, 1)
                        counted += 1
                    elif chunk.get("usage"):
                        rec.tokens += chunk["usage"]["completion_tokens"] - counted

    return await _run_clients(rec, client_task, args.clients)


def _start_daemon(args: argparse.Namespace, directory: str) -> tuple[subprocess.Popen, str]:
    from kvmm_daemon.client import Client, DaemonUnavailable

    path = os.path.join(directory, "bench.sock")
    cmd = [sys.executable, "-m", "kvmm_daemon.cli", "serve", "--socket", path, "--socket-group", "",
           "--kv-budget", str(args.kv_budget), "--log-level", "warning"]
    if args.http:
        args.http_socket = os.path.join(directory, "http.sock")
        cmd += ["--http-socket", args.http_socket]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--admit-wait-ms", str(args.admit_wait_ms)] if args.admit_wait_ms is not None else []
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


def _measure(args: argparse.Namespace, path: str, inprocess) -> dict[str, dict]:
    """One case (args.clients, args.requests): alternate the sides (after one warm-up each)
    so that load from elsewhere on the machine drifts into all of them alike; pool the rounds."""
    import trio

    engine, prompts, params = inprocess
    drivers = {"inprocess": lambda tag: _drive_engine(engine, prompts, params, args, tag),
               "daemon": lambda tag: trio.run(_drive_daemon, path, args)}
    if args.http:
        drivers["http"] = lambda tag: trio.run(_drive_http, args.http_socket, args)
    for drive in drivers.values():
        drive("w")
    sides: dict[str, list[Recorder]] = {name: [] for name in drivers}
    for r in range(args.rounds):
        for name, drive in drivers.items():
            sides[name].append(drive(f"r{r}-"))
    out = {}
    for name, recs in sides.items():
        pooled = Recorder()
        for rec in recs:
            pooled.ttft += rec.ttft
            pooled.itl += rec.itl
            pooled.tokens += rec.tokens
        out[name] = pooled.summary(sum(rec.wall_s for rec in recs), args.requests * len(recs))
    return out


def _case_result(args: argparse.Namespace, sides: dict[str, dict]) -> dict:
    """One case's figures, ratios and goals, printed as a short table."""
    inproc, daemon = sides["inprocess"], sides["daemon"]
    ratio = lambda a, b: None if not a or not b else round(a / b, 3)
    delta = lambda a, b: None if a is None or b is None else round(a - b, 2)
    ttft_goal_ms = 5 if args.clients == 1 else 10
    overhead = {"throughput_ratio": ratio(daemon["throughput_tok_s"], inproc["throughput_tok_s"]),
                "ttft_p50_ratio": ratio(daemon["ttft_p50_ms"], inproc["ttft_p50_ms"]),
                "ttft_p50_delta_ms": delta(daemon["ttft_p50_ms"], inproc["ttft_p50_ms"]),
                "itl_p50_ratio": ratio(daemon["itl_p50_ms"], inproc["itl_p50_ms"])}
    overhead["goal_met"] = (overhead["throughput_ratio"] is not None and overhead["throughput_ratio"] >= 0.9
                            and overhead["ttft_p50_delta_ms"] is not None
                            and overhead["ttft_p50_delta_ms"] <= ttft_goal_ms)
    rows = [("throughput tok/s", "throughput_tok_s"), ("TTFT p50 ms", "ttft_p50_ms"), ("TTFT p99 ms", "ttft_p99_ms"),
            ("ITL p50 ms", "itl_p50_ms"), ("ITL p99 ms", "itl_p99_ms"), ("wall s", "wall_s")]
    print(f"\n{args.clients} client(s): {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.rounds} rounds per side")
    names = {"inprocess": "in-process", "daemon": "daemon", "http": "http"}
    print(f"{'':18} " + " ".join(f"{names[n]:>12}" for n in sides))
    for label, key in rows:
        print(f"{label:18} " + " ".join(f"{sides[n][key]!s:>12}" for n in sides))
    print(f"daemon/in-process throughput {overhead['throughput_ratio']}, TTFT p50 {overhead['ttft_p50_delta_ms']:+} ms, "
          f"ITL p50 {overhead['itl_p50_ratio']} (goal: >= 0.9 and <= +{ttft_goal_ms} ms: "
          f"{'met' if overhead['goal_met'] else 'NOT met'})")
    result = {"clients": args.clients, "requests": args.requests, "inprocess": inproc, "daemon": daemon,
              "overhead": overhead}
    if "http" in sides:
        http = sides["http"]
        tr, ttft_delta = ratio(http["throughput_tok_s"], daemon["throughput_tok_s"]), delta(http["ttft_p50_ms"], daemon["ttft_p50_ms"])
        met = tr is not None and tr >= 0.9 and ttft_delta is not None and ttft_delta <= 10
        result["http"] = http
        result["http_vs_msgpack"] = {"throughput_ratio": tr, "ttft_p50_delta_ms": ttft_delta, "goal_met": met}
        print(f"http/msgpack throughput {tr}, TTFT p50 delta {ttft_delta} ms "
              f"(goal: >= 0.9 and <= +10 ms: {'met' if met else 'NOT met'})")
    return result


def _engine_loop(path: str) -> dict:
    """The daemon's engine-loop counters (steps, admission holds), to report a case's share."""
    from kvmm_daemon.client import Client

    with Client(path) as c:
        return c.stats()["server"]["engine_loop"]


def _cases(args: argparse.Namespace) -> list[argparse.Namespace]:
    return [argparse.Namespace(**{**vars(args), "clients": n, "requests": args.requests or 4 * n})
            for n in args.clients]


def run_serve_bench(args: argparse.Namespace) -> dict:
    workload = {"clients": args.clients, "requests": args.requests or "4 per client", "rounds": args.rounds,
                "max_tokens": args.max_tokens, "threads": args.threads,
                "model": args.model or "embedded SmolLM2-135M", "kv_budget": str(args.kv_budget),
                "ttft_spans": TTFT_SPANS if args.http else {k: TTFT_SPANS[k] for k in ("inprocess", "daemon")}}
    if args.socket and args.http and not args.http_socket:
        raise SystemExit("--http with --socket needs --http-socket PATH of that daemon")
    inprocess = _inprocess_engine(args)

    def measure_all(path: str) -> list[dict]:
        results = []
        for case in _cases(args):
            before = _engine_loop(path)
            results.append(_case_result(case, _measure(case, path, inprocess)))
            after = _engine_loop(path)
            results[-1]["daemon_engine_loop"] = {k: round(after[k] - before[k], 4) for k in
                                                 ("steps", "busy_s", "admit_waits", "admit_wait_s", "admit_arrivals")}
        return results

    if args.socket:
        cases = measure_all(args.socket)
    else:
        with tempfile.TemporaryDirectory(prefix="kvmm-bench-") as d:
            proc, path = _start_daemon(args, d)
            try:
                cases = measure_all(path)
            finally:
                proc.terminate()
                proc.wait(60)
    return {"workload": workload, "cases": cases}
