"""Paged attention in plain PyTorch: the CPU engine's hot path (and the CUDA fallback).

Decode gathers, for the whole batch at once, the blocks up to the longest context with one
`index_select` on the block dim of each cache (the arena views' inner dims are contiguous, so
each block is one memcpy), then runs one `scaled_dot_product_attention` with a length mask.
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

Prior art: vLLM's CPU torch-SDPA backend (per-sequence SDPA for prefill) and the gather-then-
attend fallback of nano-vllm. Left out: fused custom CPU kernels (vLLM's C++ paged kernels)
that would read the blocks in place instead of copying them; the gather costs about a third of
the attention time at batch 32 (see `contiguous_decode_sdpa`, the no-paging baseline).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _length_mask(seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """[B, 1, 1, length] bool, True where the position is inside the sequence."""
    positions = torch.arange(length, device=seq_lens.device, dtype=seq_lens.dtype)
    return (positions[None, :] < seq_lens[:, None]).view(-1, 1, 1, length)


def _decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """q [B, H, D] against k, v [B, L, H_kv, D] (any strides), masked to seq_lens."""
    batch, heads, head_dim = q.shape
    kv_heads, length = k.shape[2], k.shape[1]
    queries = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        queries, k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=_length_mask(seq_lens, length), scale=scale)
    return out.reshape(batch, heads, head_dim)


def contiguous_decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The decode math on unpaged k, v [B, max_len, H_kv, D]: the baseline for paging overhead."""
    if k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"k, v must be [B, max_len, H_kv, D] with B = {q.shape[0]}; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    return _decode_sdpa(q, k, v, seq_lens, scale)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length, H_kv, D]: the blocks block_ids [B, n] of cache laid end to end, cut to length."""
    batch, n = block_ids.shape
    blocks = cache.index_select(0, block_ids.reshape(-1))
    return blocks.view(batch, n * cache.shape[1], cache.shape[2], cache.shape[3])[:, :length]


def _block_ids(block_tables: torch.Tensor, max_len: int, block_size: int) -> torch.Tensor:
    """The first ceil(max_len / block_size) columns, -1 replaced by block 0 (masked later)."""
    needed = -(-max_len // block_size)
    assert needed <= block_tables.shape[1], "checks.check_decode guarantees wide enough tables"
    return block_tables[:, :needed].clamp(min=0)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    if q.shape[0] == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    max_len = int(seq_lens.max())
    ids = _block_ids(block_tables, max_len, k_cache.shape[1])
    k = _gather(k_cache, ids, max_len)
    v = _gather(v_cache, ids, max_len)
    return _decode_sdpa(q, k, v, seq_lens, scale)


def _prefill_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, seq_len: int, scale: float) -> torch.Tensor:
    """q [n, H, D], the last n positions of a context of seq_len tokens -> [n, H, D]."""
    n = q.shape[0]
    ids = _block_ids(block_table[None], seq_len, k_cache.shape[1])
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
