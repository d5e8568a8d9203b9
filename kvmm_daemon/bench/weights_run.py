"""One measurement of `kvmm bench weights`, run in a child process (inside a memory cgroup).

    python -m kvmm_daemon.bench.weights_run --budget 22MiB --batches 1,16 --tokens 32

prints one JSON object: for each batch, aggregate decode tokens/s over steps where every
sequence decodes (decode_bench.measure_decode), weight bytes read per decoded token, stall
share of step time; the batch-1 greedy tokens of a fixed prompt (to compare across budgets);
peak RSS (VmHWM) and the RSS split of `kvmm stats`; the I/O scheduler's figures. With no
--budget every weight is resident (the reference).
"""
from __future__ import annotations

import argparse
import json
import time

GREEDY_PROMPT = "The capital of France is"


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(args: argparse.Namespace) -> dict:
    from kvmm_daemon.bench.decode_bench import measure_decode
    from kvmm_daemon.engine_config import EngineConfig
    from kvmm_daemon.engine.engine import Engine
    from kvmm_daemon.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    engine = Engine.from_config(EngineConfig(
        model=args.model, weight_budget=args.budget, kv_budget=args.kv_budget, threads=args.threads,
        max_model_len=args.max_model_len, state_dir=args.state_dir, max_num_seqs=64))
    out: dict = {"budget": args.budget, "start_s": round(time.perf_counter() - t0, 3)}
    pool = engine.runner.model.weights
    prompt = engine.encode_prompt(text=GREEDY_PROMPT, raw=True)
    greedy = engine.generate(prompt, SamplingParams(max_tokens=args.tokens, ignore_eos=True))
    out["greedy_token_ids"] = greedy.choices[0].token_ids
    for tag, batch in enumerate(args.batches):
        measure_decode(engine, batch, 4, 100 + tag)                  # warm-up at this batch
        before, t_before = pool.statistics(), time.perf_counter()
        tps = measure_decode(engine, batch, args.tokens, tag)
        after, wall = pool.statistics(), time.perf_counter() - t_before
        steps = max(1, after.steps - before.steps)
        tokens = batch * args.tokens
        out[str(batch)] = {
            "decode_tokens_per_s": round(tps, 2),
            "bytes_read_per_token": round((after.bytes_read - before.bytes_read) / tokens),
            "bytes_read_per_step": round((after.bytes_read - before.bytes_read) / steps),
            "stall_share": round((after.stall_s - before.stall_s) / wall, 4) if wall else 0.0,
            "read_gb_per_s": round((after.bytes_read - before.bytes_read) / wall / 1e9, 3),
        }
    stats = pool.statistics()
    out.update(peak_rss=_peak_rss(), memory=engine.statistics().as_dict()["memory"],
               pool={"streaming": stats.streaming, "window": stats.window, "pinned_bytes": stats.pinned_bytes,
                     "streamed_bytes_per_step": stats.streamed_bytes_per_step, "arena_bytes": stats.resident_bytes,
                     "locked": stats.locked, "lock_error": stats.lock_error, "model_bytes": stats.file_bytes})
    if stats.streaming:
        out["io"] = pool.io.statistics().as_dict()
    engine.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default=None)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-budget", default="16MiB")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--model", default=None)
    p.add_argument("--state-dir", default=None)
    args = p.parse_args(argv)
    if argv is None:                    # a process of its own: compute as `kvmm serve` does
        from kvmm_daemon import openmp_runtime
        openmp_runtime.ensure()
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
