"""`kvmm bench kv`: what paging buys in one KV budget, on a seeded synthetic workload.

The workload imitates ShareGPT's long tail: prompt lengths 4..1024 and output lengths 4..512
drawn log-normally (seeded). The real BlockPool/KVCacheManager run it token by token (no
model: the KV bytes are irrelevant to the bookkeeping measured here):
* slot utilization: tokens held / slots of allocated blocks, averaged over every step;
* concurrency: sequences running at once under continuous batching in the budget while
  requests wait (the budget, not the arrival of work, is the limit), vs the contiguous
  baselines of the vLLM paper, run on the same batching: reserving max_model_len, prompt +
  max_tokens (also rounded up to a power of two), and an oracle that knows each output length;
* pool utilization: tokens held / slots in the whole pool at every step (mean and a series);
* copy-on-write savings: blocks held by n=4 parallel samples and by width-4 beam search
  (forks + frees as beams are re-ranked) vs the same sequences with no sharing.
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

from kvmm_daemon.kv.block_pool import BlockPool
from kvmm_daemon.kv.kv_manager import KVCacheManager


@dataclass(slots=True)
class _Seq:
    sid: int
    prompt: int
    output: int
    generated: int = 0


def workload(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    draw = lambda mu, sigma, lo, hi: max(lo, min(hi, int(rng.lognormvariate(mu, sigma))))
    return [(draw(5.3, 1.0, 4, 1024), draw(5.0, 0.9, 4, 512)) for _ in range(n)]


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(49152) for _ in range(n)]


def simulate_paged(reqs: list[tuple[int, int]], num_blocks: int, block_size: int, seed: int) -> dict:
    """Continuous batching over the real KV manager; returns utilization and concurrency."""
    rng = random.Random(seed)
    kv = KVCacheManager(BlockPool(num_blocks), block_size, "bench")
    queue = [_Seq(i, p, o) for i, (p, o) in enumerate(reqs)]
    running: list[_Seq] = []
    used_slots = held_tokens = conc_sum = steps = preempted = saturated = 0
    pool_util: list[float] = []
    while queue or running:
        while queue and kv.can_allocate(queue[0].prompt + queue[0].generated + 1):
            s = queue.pop(0)
            assert kv.allocate(s.sid, _tokens(rng, s.prompt + s.generated)) is not None
            kv.commit(s.sid, kv.num_tokens(s.sid) - kv.num_computed_tokens(s.sid))
            running.append(s)
        for s in list(running):
            if s not in running:
                continue
            while kv.append_slots(s.sid, [1]) is None:   # short: preempt the newest (recompute)
                victim = running.pop()
                kv.free(victim.sid)
                queue.insert(0, victim)
                preempted += 1
                if victim is s:
                    break
            else:
                kv.commit(s.sid, 1)
                s.generated += 1
        for s in [s for s in running if s.generated >= s.output]:
            running.remove(s)
            kv.free(s.sid)
        stats = kv.statistics().pool
        tokens = sum(kv.num_tokens(s.sid) for s in running)
        used_slots += stats.blocks_allocated * block_size
        held_tokens += tokens
        pool_util.append(tokens / (num_blocks * block_size))
        steps += 1
        if queue:   # saturated: requests are waiting for KV, so concurrency is budget-bound
            conc_sum += len(running)
            saturated += 1
    assert kv.statistics().pool.blocks_allocated == 0
    return {"slot_utilization": held_tokens / max(1, used_slots), "mean_concurrency": conc_sum / max(1, saturated),
            "steps": steps, "preemptions": preempted, "pool_utilization": pool_util}


RESERVATIONS = {
    # vLLM paper section 6's baselines: what a contiguous allocator reserves per sequence
    "max_len": lambda p, o, a: a.max_model_len,
    "prompt_plus_max_tokens": lambda p, o, a: min(a.max_model_len, p + a.max_tokens),
    "prompt_plus_max_tokens_pow2": lambda p, o, a: min(a.max_model_len, 1 << (p + a.max_tokens - 1).bit_length()),
    "oracle": lambda p, o, a: p + o,
}


def simulate_reserved(reqs: list[tuple[int, int]], budget: int, reserve) -> dict:
    """The same continuous batching (FCFS, one token per step) over a contiguous allocator
    that reserves `reserve(prompt, output)` slots per sequence up front, with no external
    fragmentation (a generous baseline): concurrency while requests wait, and tokens held
    over the whole budget at every step."""
    queue = list(reqs)
    running: list[list[int]] = []          # [prompt, output, generated, reserved]
    reserved = conc_sum = saturated = 0
    pool_util: list[float] = []
    while queue or running:
        while queue and reserved + reserve(*queue[0]) <= budget:
            p, o = queue.pop(0)
            r = reserve(p, o)
            reserved += r
            running.append([p, o, 0, r])
        assert running, "a request's reservation exceeds the whole budget"
        for s in running:
            s[2] += 1
        pool_util.append(sum(s[0] + s[2] for s in running) / budget)
        if queue:
            conc_sum += len(running)
            saturated += 1
        for s in [s for s in running if s[2] >= s[1]]:
            running.remove(s)
            reserved -= s[3]
    return {"mean_concurrency": conc_sum / max(1, saturated), "pool_utilization": pool_util}


def _series(values: list[float], points: int = 20) -> list[float]:
    """`points` evenly spaced samples of a per-step series (for the JSON)."""
    step = max(1, len(values) // points)
    return [round(v, 4) for v in values[::step]][:points]


def cow_saving(prompt: int, output: int, width: int, block_size: int, beam: bool, seed: int) -> float:
    """1 - (blocks held with CoW sharing) / (blocks the same sequences hold unshared),
    averaged over the decode steps."""
    rng = random.Random(seed)
    kv = KVCacheManager(BlockPool(100_000), block_size, "bench")
    kv.allocate(0, _tokens(rng, prompt))
    kv.commit(0, prompt)
    live = [0] + list(range(1, width))
    for child in live[1:]:
        kv.fork(0, child)
    next_id, shared_sum, unshared_sum = width, 0, 0
    for _ in range(output):
        if beam:   # re-rank: some beams continue twice (fork), others are dropped (free)
            parents = sorted(rng.choices(live, k=width))
            survivors, new_live = set(), []
            for p in parents:
                if p in survivors:
                    kv.fork(p, next_id)
                    new_live.append(next_id)
                    next_id += 1
                else:
                    survivors.add(p)
                    new_live.append(p)
            for p in live:
                if p not in survivors:
                    kv.free(p)
            live = new_live
        for s in live:
            assert kv.append_slots(s, [1]) is not None
            kv.commit(s, 1)
        kv.take_pending_copies()
        shared_sum += kv.statistics().pool.blocks_allocated
        unshared_sum += sum(-(-kv.num_tokens(s) // block_size) for s in live)
    return 1.0 - shared_sum / unshared_sum


def register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--budget-tokens", type=int, default=65536, help="KV budget in token slots")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=512, help="max_tokens each request asks (the "
                   "workload's longest output) for the prompt + max_tokens baselines")


def run_kv_bench(args: argparse.Namespace) -> dict:
    reqs = workload(args.requests, args.seed)
    num_blocks = args.budget_tokens // args.block_size
    paged = simulate_paged(reqs, num_blocks, args.block_size, args.seed)
    contiguous = args.budget_tokens // args.max_model_len
    mean_prompt = sum(p for p, _ in reqs) / len(reqs)
    mean_out = sum(o for _, o in reqs) / len(reqs)
    prompt, out = int(mean_prompt), int(mean_out)
    par = cow_saving(prompt, out, 4, args.block_size, beam=False, seed=args.seed)
    beam = cow_saving(prompt, out, 4, args.block_size, beam=True, seed=args.seed)
    baselines = {name: simulate_reserved(reqs, args.budget_tokens, lambda p, o, f=f: f(p, o, args))
                 for name, f in RESERVATIONS.items()}
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    result = {
        "kv_slot_utilization": round(paged["slot_utilization"], 4),
        "pool_utilization": {"paged": round(mean(paged["pool_utilization"]), 4),
                             **{n: round(mean(b["pool_utilization"]), 4) for n, b in baselines.items()}},
        "pool_utilization_over_time": {"paged": _series(paged["pool_utilization"]),
                                       **{n: _series(b["pool_utilization"]) for n, b in baselines.items()}},
        "concurrency_baselines": {n: round(b["mean_concurrency"], 2) for n, b in baselines.items()},
        "concurrency_vs_baselines": {n: round(paged["mean_concurrency"] / max(1e-9, b["mean_concurrency"]), 2)
                                     for n, b in baselines.items()},
        "concurrency_vs_contiguous": round(paged["mean_concurrency"] / contiguous, 2),
        "parallel_sampling_kv_saving": round(par, 4),
        "beam_search_kv_saving": round(beam, 4),
        "paged_mean_concurrency": round(paged["mean_concurrency"], 2),
        "contiguous_concurrency": contiguous,
        "preemptions": paged["preemptions"],
        "workload": {"requests": len(reqs), "mean_prompt": round(mean_prompt, 1), "mean_output": round(mean_out, 1),
                     "block_size": args.block_size, "budget_tokens": args.budget_tokens,
                     "max_model_len": args.max_model_len, "seed": args.seed},
    }
    print(f"{'metric':<34}{'kvmm (paged)':>14}{'baseline':>14}")
    print(f"{'KV slot utilization':<34}{result['kv_slot_utilization']:>14.4f}{'-':>14}")
    for name, b in baselines.items():
        print(f"{'concurrent sequences':<34}{paged['mean_concurrency']:>14.1f}{b['mean_concurrency']:>14.1f}"
              f"  (contiguous, reserving {name})")
    for name, u in result["pool_utilization"].items():
        print(f"{'pool utilization (mean), ' + name:<34}{u:>14.2%}")
    print(f"{'KV saved, n=4 parallel sampling':<34}{par:>14.2%}{0:>14.0%}  (no sharing)")
    print(f"{'KV saved, beam width 4':<34}{beam:>14.2%}{0:>14.0%}  (no sharing)")
    return result
