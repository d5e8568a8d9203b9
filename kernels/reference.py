"""Plain PyTorch reference for paged attention and the KV write; the yardstick of the tests.

Written to be obviously correct rather than fast: one sequence at a time, each key/value
token fetched through the block table by `block_tables[s, t // block_size]` and
`t % block_size`, every head expanded to its KV head (GQA by repetition), float32 math with
an explicit causal mask and softmax. Decode is literally prefill with one query per sequence.
Follows the math of vLLM's `ref_paged_attn` test helper; nothing here is used on the hot path.
"""
from __future__ import annotations

import torch


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence, [seq_len, num_kv_heads, head_dim], in order."""
    block_size = cache.shape[1]
    rows = []
    for t in range(seq_len):
        block = int(block_table[t // block_size])
        assert block >= 0, f"token {t} maps to an empty block table entry"
        rows.append(cache[block, t % block_size])
    return torch.stack(rows)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Query i of sequence s sits at position seq_lens[s] - query_len[s] + i and attends
    causally to positions 0..that position of its own context."""
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for s in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        seq_len = int(seq_lens[s])
        if end == start:
            continue
        keys = gather_context(k_cache, block_tables[s], seq_len).float()
        values = gather_context(v_cache, block_tables[s], seq_len).float()
        keys = keys.repeat_interleave(group, dim=1)          # [seq_len, num_heads, D]
        values = values.repeat_interleave(group, dim=1)
        queries = q[start:end].float()                       # [n, num_heads, D]
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        positions = seq_len - (end - start) + torch.arange(end - start, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= positions[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One query per sequence, at the last position of its context."""
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention_prefill(q, k_cache, v_cache, block_tables, query_start_loc,
                                   seq_lens, scale)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Token i goes to block slot // block_size, offset slot % block_size; slot -1 is skipped."""
    block_size = k_cache.shape[1]
    for i in range(k.shape[0]):
        slot = int(slot_mapping[i])
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = k[i]
        v_cache[slot // block_size, slot % block_size] = v[i]
