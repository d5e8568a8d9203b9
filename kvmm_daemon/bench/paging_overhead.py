"""What paging costs decode attention: each kernel against itself on an unpaged layout.

A cell of the grid (batch x context x threads) times, per attention path, the same kernel on
the same K/V data in two places:

* **paged**: one layer of the engine's own arena (`KVCache`, huge pages, its real layout and
  size: enough blocks for the largest cell), the sequences' blocks handed out by the engine's
  `BlockPool` after churn (every block allocated, then freed in a seeded random order, the
  way blocks come back as requests finish), one block per sequence in turn, as sequences
  that decode together grow;
* **contiguous**: the same bytes in sequence order in a compact huge-page buffer
  [blocks, 2, block_size, kv_heads, head_dim] (each block's K then V, as in the arena)
  with the identity block table.

Paths: `native` (the C++ kernel, when built) and `torch` (torch_paged's gather + SDPA), each
called through its backend module as the dispatcher does after its checks (which cost the
same on both layouts). Successive calls of a variant take `layers` layers in turn (each
with its own compact copy), as a decode step does: with layers=1 the same layer is read
call after call and small cells run from the core's L2, where the compact copy's perfectly
even spread over cache sets flatters it; with layers=8 (the default) every cell's working
set exceeds L2, as the engine's 30 layers per step do. The third column is torch's SDPA on unpaged [batch, context,
kv_heads, head_dim] tensors, the generic baseline. Each variant's figure is its best call
over `rounds` rounds of `reps` calls; the rounds interleave the variants, so drift of the
machine hits all alike. overhead = paged / contiguous of the same path; the goal is <= 1.10
in every cell. Random data (the kernels' speed does not depend on it); the arena is zero
filled except the layer measured.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from iosched.aligned_buffer import AlignedBuffer
from kvmm_daemon.kv.block_pool import BlockPool
from kvmm_daemon.kv.kv_cache import KVCache

GOAL = 1.10


@dataclass(frozen=True, slots=True)
class Geometry:
    """The attention shapes of one model: query heads, KV heads, head_dim, layers."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    block_size: int = 16
    dtype: torch.dtype = torch.float32


def scattered_tables(num_blocks: int, batch: int, blocks_per_seq: int,
                     seed: int) -> torch.Tensor:
    """int32 [batch, blocks_per_seq]: the block ids a churned BlockPool of `num_blocks`
    hands to `batch` sequences that grow together (one block each in turn)."""
    pool = BlockPool(num_blocks)
    every = pool.get_new_blocks(num_blocks)
    assert every is not None
    random.Random(seed).shuffle(every)
    pool.free_blocks(every)
    tables = [[0] * blocks_per_seq for _ in range(batch)]
    for col in range(blocks_per_seq):
        for seq in range(batch):
            got = pool.get_new_blocks(1)
            if got is None:
                raise ValueError(f"an arena of {num_blocks} blocks cannot hold {batch} x "
                                 f"{blocks_per_seq} blocks; size it for the largest cell")
            tables[seq][col] = got[0].block_id
    return torch.tensor(tables, dtype=torch.int32)


class CompactCopy:
    """The blocks of `tables` copied in sequence order into a compact huge-page buffer.

    Attributes: k_cache, v_cache [n, block_size, kv_heads, head_dim] views of the buffer
    (block i of the copy is table entry i in row-major order); tables: the identity table
    of the same shape; _buffer: the AlignedBuffer behind them (freed by close()).
    """

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 tables: torch.Tensor) -> None:
        n = tables.numel()
        shape = (n, 2, *k_cache.shape[1:])
        nbytes = n * 2 * k_cache[0].numel() * k_cache.element_size()
        self._buffer = AlignedBuffer(nbytes, huge_pages=True, populate=True)
        raw = torch.frombuffer(self._buffer.view[:nbytes], dtype=torch.uint8)
        blocks = raw.view(k_cache.dtype).view(shape)
        ids = tables.reshape(-1).long()
        blocks[:, 0] = k_cache.index_select(0, ids)
        blocks[:, 1] = v_cache.index_select(0, ids)
        self.k_cache, self.v_cache = blocks[:, 0], blocks[:, 1]
        self.tables = torch.arange(n, dtype=torch.int32).view(tables.shape)

    def unpaged(self, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as [batch, context, kv_heads, head_dim] (views: the copy is in order)."""
        shape = (batch, -1, *self.k_cache.shape[2:])
        return (self.k_cache.reshape(shape)[:, :context], self.v_cache.reshape(shape)[:, :context])

    def close(self) -> None:
        self.k_cache = self.v_cache = None
        self._buffer.close()


def _best_of(fns: dict[str, list[Callable[[], object]]], rounds: int,
             reps: int) -> dict[str, float]:
    """Each variant's fastest call (seconds) over `rounds` interleaved rounds of `reps`
    calls; a variant's calls take its callables (one per layer) in turn."""
    best = {name: float("inf") for name in fns}
    for calls in fns.values():
        for fn in calls:
            fn()                                               # warm-up
    for _ in range(rounds):
        for name, calls in fns.items():
            for i in range(reps):
                fn = calls[i % len(calls)]
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _paths() -> dict[str, object]:
    """The attention backends measured: the torch path always, native when it is built."""
    from kernels import cpu_native, torch_paged
    paths: dict[str, object] = {}
    if not isinstance(cpu_native.extension(), str):
        paths["native"] = cpu_native
    paths["torch"] = torch_paged
    return paths


def measure_cell(kv: KVCache, layers: Sequence[int], geo: Geometry, batch: int,
                 context: int, *, rounds: int, reps: int, seed: int) -> dict:
    """One cell: per path the paged and contiguous call time, and SDPA's."""
    from kernels.torch_paged import contiguous_decode_sdpa

    blocks_per_seq = -(-context // geo.block_size)
    tables = scattered_tables(kv.num_blocks, batch, blocks_per_seq, seed)
    caches = [kv.layer(layer) for layer in layers]
    copies: list[CompactCopy] = []
    try:
        for k_cache, v_cache in caches:
            copies.append(CompactCopy(k_cache, v_cache, tables))
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(batch, geo.num_heads, geo.head_dim, generator=g).to(geo.dtype)
        seq_lens = torch.full((batch,), context, dtype=torch.int32)
        scale = geo.head_dim ** -0.5
        unpaged = [copy.unpaged(batch, context) for copy in copies]
        fns: dict[str, list[Callable[[], object]]] = {}
        for name, mod in _paths().items():
            fns[f"{name}_paged"] = [
                (lambda m=mod, k=k, v=v: m.paged_attention_decode(q, k, v, tables, seq_lens,
                                                                  scale)) for k, v in caches]
            fns[f"{name}_contiguous"] = [
                (lambda m=mod, c=c: m.paged_attention_decode(q, c.k_cache, c.v_cache, c.tables,
                                                             seq_lens, scale)) for c in copies]
            for paged, contiguous in zip(fns[f"{name}_paged"], fns[f"{name}_contiguous"]):
                if not torch.equal(paged(), contiguous()):
                    raise AssertionError(f"{name}: paged and contiguous outputs differ; the "
                                         f"copy or the block table is wrong")
        fns["sdpa"] = [(lambda k=k, v=v: contiguous_decode_sdpa(q, k, v, seq_lens, scale))
                       for k, v in unpaged]
        best = _best_of(fns, rounds, reps)
    finally:
        del fns, unpaged
        for copy in copies:
            copy.close()
    row: dict = {"batch": batch, "context": context, "threads": torch.get_num_threads()}
    for name in _paths():
        paged, contiguous = best[f"{name}_paged"], best[f"{name}_contiguous"]
        row[name] = {"paged_us": round(paged * 1e6, 1),
                     "contiguous_us": round(contiguous * 1e6, 1),
                     "overhead": round(paged / contiguous, 3)}
    row["sdpa_us"] = round(best["sdpa"] * 1e6, 1)
    return row


def paging_overhead(geo: Geometry, *, batches: Sequence[int] = (1, 8, 32),
                    contexts: Sequence[int] = (256, 1024, 2048),
                    threads: Sequence[int] = (1, 2), rounds: int = 4, reps: int = 10,
                    layers: int = 8, seed: int = 0, layers_per_piece: int | None = None) -> dict:
    """The grid: one row per (threads, batch, context), and the worst overhead per path.

    The arena is one KVCache with room for the largest cell plus one block per sequence
    (a churned pool never hands out every block to one cell); `layers` of its layers,
    spread over the model, are taken in turn. Restores torch's thread count when done."""
    blocks_per_seq = -(-max(contexts) // geo.block_size)
    num_blocks = max(batches) * (blocks_per_seq + 1)
    kv = KVCache(num_blocks, num_layers=geo.num_layers, block_size=geo.block_size,
                 num_kv_heads=geo.num_kv_heads, head_dim=geo.head_dim, dtype=geo.dtype,
                 layers_per_piece=layers_per_piece)
    if not 1 <= layers <= geo.num_layers:
        raise ValueError(f"layers={layers}: take 1 to the model's {geo.num_layers} layers")
    picked = sorted({i * geo.num_layers // layers for i in range(layers)})
    g = torch.Generator().manual_seed(seed)
    for layer in picked:
        for cache in kv.layer(layer):
            cache.copy_(torch.randn(cache.shape, generator=g).to(geo.dtype))
    before = torch.get_num_threads()
    rows = []
    try:
        for t in threads:
            torch.set_num_threads(t)
            for batch in batches:
                for context in contexts:
                    rows.append(measure_cell(kv, picked, geo, batch, context, rounds=rounds,
                                             reps=reps, seed=seed + batch * 7919 + context))
    finally:
        torch.set_num_threads(before)
    paths = [name for name in ("native", "torch") if name in rows[0]]
    worst = {name: max(r[name]["overhead"] for r in rows) for name in paths}
    return {"rows": rows, "worst_overhead": worst, "goal": GOAL,
            "arena": {"num_blocks": kv.num_blocks, "layers_per_piece": kv.layers_per_piece, "layers_in_turn": picked,
                      "block_stride_bytes": kv.layer(0)[0].stride(0) * kv.dtype.itemsize,
                      "huge_page_fraction": kv.huge_page_fraction()},
            "rounds": rounds, "reps": reps}


def print_table(result: dict) -> None:
    paths = list(result["worst_overhead"])
    head = f"{'threads':>7}{'batch':>6}{'context':>8}"
    for name in paths:
        head += f"{name + ' paged us':>18}{'contig us':>11}{'ratio':>7}"
    print(head + f"{'sdpa us':>10}")
    for r in result["rows"]:
        line = f"{r['threads']:>7}{r['batch']:>6}{r['context']:>8}"
        for name in paths:
            c = r[name]
            line += f"{c['paged_us']:>18.1f}{c['contiguous_us']:>11.1f}{c['overhead']:>7.3f}"
        print(line + f"{r['sdpa_us']:>10.1f}")
    worst = ", ".join(f"{name} {v:.3f}" for name, v in result["worst_overhead"].items())
    arena = result["arena"]
    huge = arena["huge_page_fraction"]
    print(f"worst paged / contiguous: {worst} (goal <= {result['goal']:.2f}); arena block "
          f"stride {arena['block_stride_bytes']} B, huge pages "
          f"{'-' if huge is None else f'{huge:.0%}'}, layers in turn {len(arena['layers_in_turn'])}")
