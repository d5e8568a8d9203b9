"""Paged attention in plain PyTorch: the CPU engine's hot path (and the CUDA fallback).

Decode gathers, for the whole batch at once, the blocks up to the longest context with one
`index_select` on the block dim of each cache (the arena views' inner dims are contiguous, so
each block is one memcpy), then runs one `scaled_dot_product_attention` with a length mask.
Big batches of long contexts are cut into chunks of sequences whose gathered K/V stay under
GATHER_CHUNK_BYTES, so the transient copy stays small and is not page-faulted in anew each call.
GQA costs no copies: q [B, H, D] is viewed as [B, kv_heads, group, D], so the group's heads
play the role of query rows against their shared KV head. Table entries past a sequence's
blocks (-1 padding) are replaced by block 0 before the gather and masked out, never
dereferenced. Masked positions are excluded by the mask, not zeroed, so they must hold finite
values (NaN times a zero weight is NaN): the KV arena starts zeroed and only ever holds K/V
written by `reshape_and_cache` or read back from swapfs, which keeps that true. (The Triton
kernels do not load masked positions at all.)

Prefill serves ragged batches: sequences with one query token (decodes mixed into a prefill
step) go through the batched decode path; every longer sequence is gathered and attended on
its own (its queries amortise the Python loop), with a causal mask shifted by its cached
prefix, or SDPA's `is_causal` when there is no prefix.

Prior art: vLLM's CPU torch-SDPA backend, which also runs SDPA per sequence for prefill.
The copy is the price of paging here: with SmolLM2's shapes at context 256 on 2 threads, paged
decode takes about 1.6-1.9x the time of `contiguous_decode_sdpa` (the same math on unpaged
tensors) at batch 8-32, 2x at batch 1. The native kernels (`cpu_native.py`) read the blocks in
place instead and serve CPU decode whenever they are built; this path remains the fallback.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Decode gathers K and V for at most this many bytes of sequences at a time: it bounds the
# transient memory and keeps the buffers small enough for the allocator to reuse.
GATHER_CHUNK_BYTES = 8 << 20


def _length_mask(seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """[B, 1, 1, length] bool, True where the position is inside the sequence."""
    positions = torch.arange(length, device=seq_lens.device, dtype=seq_lens.dtype)
    return (positions[None, :] < seq_lens[:, None]).view(-1, 1, 1, length)


def _decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
                 shortest: int, scale: float) -> torch.Tensor:
    """q [B, H, D] against k, v [B, L, H_kv, D] (any strides), masked to seq_lens, whose
    minimum is `shortest` (no mask at all when every sequence spans the L positions)."""
    batch, heads, head_dim = q.shape
    kv_heads, length = k.shape[2], k.shape[1]
    queries = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    mask = _length_mask(seq_lens, length) if shortest < length else None
    out = F.scaled_dot_product_attention(queries, k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, head_dim)


def contiguous_decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The decode math on unpaged k, v [B, max_len, H_kv, D]: the baseline for paging overhead."""
    if k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"k, v must be [B, max_len, H_kv, D] with B = {q.shape[0]}; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    return _decode_sdpa(q, k, v, seq_lens, min(seq_lens.tolist()), scale)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length, H_kv, D]: the blocks block_ids [B, n] of cache laid end to end, cut to length."""
    batch, n = block_ids.shape
    blocks = cache.index_select(0, block_ids.reshape(-1))
    return blocks.view(batch, n * cache.shape[1], cache.shape[2], cache.shape[3])[:, :length]


def _block_ids(block_tables: torch.Tensor, shortest: int, longest: int,
               block_size: int) -> torch.Tensor:
    """The columns covering the longest context. When a shorter sequence leaves -1 padding
    among them, it is replaced by block 0 (masked later)."""
    needed = -(-longest // block_size)
    assert needed <= block_tables.shape[1], "checks guarantee wide enough tables"
    ids = block_tables[:, :needed]
    return ids.clamp(min=0) if -(-shortest // block_size) < needed else ids


def _decode_chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, lengths: list[int],
                  scale: float) -> torch.Tensor:
    shortest, longest = min(lengths), max(lengths)
    ids = _block_ids(block_tables, shortest, longest, k_cache.shape[1])
    k = _gather(k_cache, ids, longest)
    v = _gather(v_cache, ids, longest)
    return _decode_sdpa(q, k, v, seq_lens, shortest, scale)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    batch = q.shape[0]
    if batch == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lengths = seq_lens.tolist()
    token_bytes = 2 * k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
    chunk = max(1, GATHER_CHUNK_BYTES // (token_bytes * max(lengths)))
    if chunk >= batch:
        return _decode_chunk(q, k_cache, v_cache, block_tables, seq_lens, lengths, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        out[rows] = _decode_chunk(q[rows], k_cache, v_cache, block_tables[rows], seq_lens[rows],
                                  lengths[rows], scale)
    return out


def _prefill_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_len: int, scale: float) -> torch.Tensor:
    """q [n, H, D], the last n positions of a context of seq_len tokens -> [n, H, D]."""
    n = q.shape[0]
    ids = _block_ids(block_table[None], seq_len, seq_len, k_cache.shape[1])
    k = _gather(k_cache, ids, seq_len).transpose(1, 2)          # [1, H_kv, L, D]
    v = _gather(v_cache, ids, seq_len).transpose(1, 2)
    queries = q.transpose(0, 1)[None]                           # [1, H, n, D]
    if n == seq_len:
        out = F.scaled_dot_product_attention(queries, k, v, is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        positions = torch.arange(seq_len, device=q.device)
        visible = positions[None, :] <= positions[seq_len - n:, None]
        out = F.scaled_dot_product_attention(queries, k, v, attn_mask=visible, scale=scale,
                                             enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    singles = [s for s in range(len(lengths)) if starts[s + 1] - starts[s] == 1]
    if len(singles) == len(lengths):
        return paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if singles:
        rows = torch.tensor(singles, device=q.device)
        tokens = query_start_loc[:-1].index_select(0, rows)
        out[tokens] = paged_attention_decode(q.index_select(0, tokens), k_cache, v_cache,
                                             block_tables.index_select(0, rows),
                                             seq_lens.index_select(0, rows), scale)
    for s, seq_len in enumerate(lengths):
        start, end = starts[s], starts[s + 1]
        if end - start > 1:
            out[start:end] = _prefill_one(q[start:end], k_cache, v_cache, block_tables[s],
                                          seq_len, scale)
    return out


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Writes in place through the (possibly strided) cache views; slot -1 is skipped."""
    if k.shape[0] == 0:
        return
    slots = slot_mapping
    if int(slots.min()) < 0:
        keep = (slots >= 0).nonzero().squeeze(1)
        slots, k, v = slots.index_select(0, keep), k.index_select(0, keep), v.index_select(0, keep)
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache.index_put_((blocks, offsets), k)
    v_cache.index_put_((blocks, offsets), v)
