"""`kvmm bench resume`: what the flash tier buys — a session's next turn resumed from flash
vs recomputed, and throughput under memory pressure with swap vs recompute preemption.

* resume: for each history length L (`--lengths`, default 256, 1024, 2048 tokens) and each
  of `--repeats` distinct histories, a session's first turn (L tokens, one output token) is
  written through to flash by one engine, which is then closed: its memory is gone, as
  after a restart. A second engine on the same swap directory runs the session's next turn
  (`--turn-tokens` new tokens, one output token); its time to first token is the resume
  time (reading the KV back with O_DIRECT, then computing the new tokens over it). The
  recompute time is the TTFT of the same history + turn on an engine without a flash tier
  and with nothing cached. Both sides alternate per history; medians; speedup =
  recompute / resume. Every engine runs a warm-up request first.
* pressure: `--pressure-requests` requests of `--pressure-prompt` random tokens, each
  decoding `--pressure-tokens` tokens (ignore_eos), all submitted at once to a KV pool of
  `--pressure-fit` requests at full length, so the newest are preempted as the others grow:
  preemption="swap" (flash tier) vs "recompute" (no flash tier, so no dropped block comes
  back from the prefix cache's flash tier either; full blocks of a dropped request still
  stay in memory as cached prefix blocks until evicted). Completion tokens/s over the wall
  time, preemptions, tokens brought back from flash and tokens computed twice. The two
  engines run `--pressure-rounds` rounds alternately (fresh prompts each round), so load
  from elsewhere on the machine drifts into both alike; the best round of each is shown.

The swap spaces live in a fresh directory under `--swap-dir` (default /var/tmp: O_DIRECT
needs a real file system, not tmpfs), removed at the end. Left out: concurrent clients
(`kvmm bench serve`), raw device bandwidth (`kvmm bench swap`).
"""
from __future__ import annotations

import argparse
import gc
import random
import shutil
import statistics
import tempfile
import time


from kvmm_daemon.engine_config import EngineConfig
from kvmm_daemon.engine.sampling_params import SamplingParams
from kvmm_daemon.errors import KvmmError
from swapfs.slot_store import slot_stride

ONE = SamplingParams(max_tokens=1, ignore_eos=True)


def register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or safetensors dir (default: embedded SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=2, help="compute threads (default 2)")
    p.add_argument("--swap-dir", default="/var/tmp",
                   help="a fresh swap space is made (and removed) in a new directory under this one (default /var/tmp)")
    p.add_argument("--swap-size", default="1GiB", help="slot file size of the resume swap space (default 1GiB)")
    p.add_argument("--kv-budget", default="256MiB", help="KV budget of the resume engines (default 256MiB)")
    p.add_argument("--lengths", default="256,1024,2048", help="session history lengths in tokens")
    p.add_argument("--turn-tokens", type=int, default=16, help="new tokens of the resumed turn (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="histories per length, median taken (default 3)")
    p.add_argument("--pressure-requests", type=int, default=8, help="concurrent requests (default 8)")
    p.add_argument("--pressure-prompt", type=int, default=256, help="prompt tokens per request (default 256)")
    p.add_argument("--pressure-tokens", type=int, default=256, help="decoded tokens per request (default 256)")
    p.add_argument("--pressure-fit", type=float, default=3.0,
                   help="KV pool size in requests at full length (default 3.0)")
    p.add_argument("--pressure-rounds", type=int, default=2,
                   help="alternating rounds per mode, the best reported (default 2)")


def _engine(args: argparse.Namespace, **cfg):
    from kvmm_daemon.engine.engine import Engine
    engine = Engine.from_config(EngineConfig(model=args.model, threads=args.threads, **cfg))
    engine.generate(_tokens(engine, 48, seed=-1), SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    return engine


def _tokens(engine, n: int, *, seed: int) -> list[int]:
    """n random ordinary token ids; distinct seeds share no prefix block."""
    rng = random.Random(seed)
    hi = min(engine.spec.vocab_size, 40000)
    return [rng.randrange(hi // 40, hi) for _ in range(n)]


def measure_resume(args: argparse.Namespace, swap_dir: str, lengths: list[int]) -> dict:
    longest = max(lengths) + args.turn_tokens + 16
    cfg = dict(kv_budget=args.kv_budget, max_model_len=max(2304, longest), max_num_batched_tokens=512)
    flash_cfg = dict(cfg, swap_dir=swap_dir, swap_size=args.swap_size)
    writer = _engine(args, **flash_cfg)
    histories: dict[tuple[int, int], list[int]] = {}
    first_turn: dict[int, list[float]] = {n: [] for n in lengths}
    writer.generate(_tokens(writer, 64, seed=-2), ONE, session_id="warm-up")
    for n in lengths:
        for rep in range(args.repeats):
            sid = f"resume-{n}-{rep}"
            res = writer.generate(_tokens(writer, n, seed=n * 100 + rep), ONE, session_id=sid)
            first_turn[n].append(res.timings.ttft_s)
            if not writer.sessions[sid].on_flash:
                raise KvmmError(f"session {sid} was not written to flash (see the log); "
                                f"check --swap-dir {args.swap_dir} and raise --swap-size")
            histories[n, rep] = list(writer.sessions[sid].token_ids)
    writer.close()                           # the sessions' memory is gone, as after a restart
    del writer
    gc.collect()
    resumer = _engine(args, **flash_cfg)
    recomputer = _engine(args, **cfg)
    turn = _tokens(resumer, args.turn_tokens, seed=7)
    resumer.generate(turn, ONE, session_id="warm-up")        # the first load pays one-time costs
    flash_s: dict[int, list[float]] = {n: [] for n in lengths}
    recompute_s: dict[int, list[float]] = {n: [] for n in lengths}
    for n in lengths:
        for rep in range(args.repeats):
            history = histories[n, rep]
            res = resumer.generate(turn, ONE, session_id=f"resume-{n}-{rep}")
            if res.usage.cached_prompt_tokens != len(history) - 1:
                raise KvmmError(f"the {n}-token session resumed {res.usage.cached_prompt_tokens} of "
                                f"{len(history) - 1} tokens from flash; see the log for swapfs errors")
            flash_s[n].append(res.timings.ttft_s)
            res = recomputer.generate(history + turn, ONE)
            assert res.usage.cached_prompt_tokens == 0
            recompute_s[n].append(res.timings.ttft_s)
    flash = resumer.statistics().flash
    block_bytes = resumer.runner.kv_cache.block_bytes
    resumer.close()
    del resumer, recomputer
    gc.collect()
    rows = {}
    for n in lengths:
        f, r = statistics.median(flash_s[n]), statistics.median(recompute_s[n])
        rows[str(n)] = {"flash_ttft_s": round(f, 4), "recompute_ttft_s": round(r, 4),
                        "speedup": round(r / f, 2), "first_turn_ttft_s": round(statistics.median(first_turn[n]), 4)}
    return {"rows": rows, "block_bytes": block_bytes, "flash": {k: flash[k] for k in ("session_tokens_from_flash", "read_bandwidth",
                                                          "write_bandwidth", "errors")}}


def _pressure_engine(args: argparse.Namespace, mode: str, swap_dir: str | None, block_bytes: int):
    bs = 16
    full_blocks = -(-(args.pressure_prompt + args.pressure_tokens) // bs)
    blocks = max(full_blocks + 1, int(args.pressure_fit * full_blocks))
    swap_size = (32 << 20) + args.pressure_requests * full_blocks * slot_stride(block_bytes)
    return _engine(args, kv_budget=blocks * block_bytes, block_size=bs,
                   max_model_len=args.pressure_prompt + args.pressure_tokens + bs,
                   max_num_seqs=args.pressure_requests, max_num_batched_tokens=512, swap_dir=swap_dir,
                   preemption=mode, swap_size=swap_size)


def pressure_round(engine, args: argparse.Namespace, rnd: int) -> dict:
    """One run of the pressure workload (prompts distinct per round: no cache hits)."""
    n, prompt_len, out_len = args.pressure_requests, args.pressure_prompt, args.pressure_tokens
    base = engine.statistics()
    params = SamplingParams(max_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(n):
        engine.add_request(f"r{rnd}-{i}", _tokens(engine, prompt_len, seed=10_000 * (rnd + 1) + i), params)
    completion = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error:
                raise KvmmError(f"pressure request {out.request_id} failed: {out.error}")
            completion += sum(len(d.token_ids) for d in out.deltas)
    wall = time.perf_counter() - t0
    st = engine.statistics()
    flash, flash0 = st.flash or {}, base.flash or {}
    return {"tokens_per_s": round(completion / wall, 2), "wall_s": round(wall, 2),
            "kv_blocks": engine.kv.pool.num_blocks,
            "preemptions": st.requests["preemptions"] - base.requests["preemptions"],
            "swapped_in_tokens": flash.get("swapped_in_tokens", 0) - flash0.get("swapped_in_tokens", 0),
            "recomputed_tokens": (st.tokens_computed - base.tokens_computed) - n * (prompt_len + out_len - 1),
            "flash_errors": flash.get("errors", {})}


def measure_pressure(args: argparse.Namespace, swap_dir: str, block_bytes: int) -> dict:
    """Both modes, rounds alternating (load from elsewhere drifts into both alike); the
    best round of each is reported, every round's tokens/s kept."""
    engines = {"swap": _pressure_engine(args, "swap", swap_dir, block_bytes),
               "recompute": _pressure_engine(args, "recompute", None, block_bytes)}
    rounds: dict[str, list[dict]] = {m: [] for m in engines}
    for rnd in range(args.pressure_rounds):
        for mode, engine in engines.items():
            rounds[mode].append(pressure_round(engine, args, rnd))
    for engine in engines.values():
        engine.close()
    engines.clear()
    gc.collect()
    out = {}
    for mode, rs in rounds.items():
        best = max(rs, key=lambda r: r["tokens_per_s"])
        out[mode] = dict(best, rounds_tokens_per_s=[r["tokens_per_s"] for r in rs])
    return out


def run_resume_bench(args: argparse.Namespace) -> dict:
    import torch  # here, not at import: `kvmm --help` stays fast

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    work = tempfile.mkdtemp(prefix="kvmm-bench-resume-", dir=args.swap_dir)
    try:
        resume = measure_resume(args, f"{work}/resume", lengths)
        block_bytes = resume.pop("block_bytes")
        pressure = measure_pressure(args, f"{work}/pressure", block_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = resume["rows"]
    print(f"resume: TTFT of a session's next turn ({args.turn_tokens} new tokens), median of {args.repeats}")
    print(f"{'history':>8}{'from flash s':>14}{'recompute s':>13}{'speedup':>9}")
    for n, r in rows.items():
        print(f"{n:>8}{r['flash_ttft_s']:>14.3f}{r['recompute_ttft_s']:>13.3f}{r['speedup']:>8.1f}x")
    print(f"\npressure: {args.pressure_requests} requests x ({args.pressure_prompt} prompt + "
          f"{args.pressure_tokens} new tokens), KV pool of {pressure['swap']['kv_blocks']} blocks")
    print(f"best of {args.pressure_rounds} alternating rounds; tokens: KV read back from flash / computed twice")
    print(f"{'preemption':>10}{'tok/s':>9}{'wall s':>9}{'preempts':>10}{'from flash':>12}{'recomputed':>12}")
    for mode, r in pressure.items():
        print(f"{mode:>10}{r['tokens_per_s']:>9.1f}{r['wall_s']:>9.1f}{r['preemptions']:>10}"
              f"{r['swapped_in_tokens']:>12}{r['recomputed_tokens']:>12}")
    return {"resume_speedup": {n: r["speedup"] for n, r in rows.items()},
            "resume_ttft_s": {n: {"flash": r["flash_ttft_s"], "recompute": r["recompute_ttft_s"]}
                              for n, r in rows.items()},
            "first_turn_ttft_s": {n: r["first_turn_ttft_s"] for n, r in rows.items()},
            "resume_flash": resume["flash"],
            "pressure_tokens_per_s": {m: r["tokens_per_s"] for m, r in pressure.items()},
            "pressure": pressure,
            "config": {"threads": args.threads, "turn_tokens": args.turn_tokens, "repeats": args.repeats,
                       "pressure_requests": args.pressure_requests, "pressure_prompt": args.pressure_prompt,
                       "pressure_tokens": args.pressure_tokens, "pressure_fit": args.pressure_fit,
                       "pressure_rounds": args.pressure_rounds}}
