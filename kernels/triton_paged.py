"""Triton paged-attention kernels (decode, causal varlen prefill) and the KV write.

The kernels walk a sequence's context in tiles of TILE tokens that are independent of the
block size: token t is read from block `block_tables[s, t // block_size]` at offset
`t % block_size`, so any block size (1, 16, 32, not a power of two) works, and table entries
past the context (-1) are masked loads that are never dereferenced. Softmax is the online
(flash-attention) form in float32: a running max, a running sum and a rescaled accumulator.

- decode: one program per (sequence, KV head); the `group` query heads that share the KV head
  are the rows of one tile, so GQA reads each K/V tile once (rows padded to 16 for `tl.dot`).
- prefill: one program per (sequence, tile of BLOCK_M queries, query head); query i of
  sequence s sits at position seq_len - query_len + i and sees keys up to that position.
- reshape_and_cache: one program per token; slot -1 is skipped.

Precision: loads are widened to float32 before any arithmetic (the interpreter has no
bfloat16 arithmetic). `tl.dot` runs in IEEE fp32 for float32 caches and in tf32 for 16-bit
caches, where every operand from the cache is exact in tf32.

Without CUDA the kernels run in Triton's interpreter: importing this module sets
`TRITON_INTERPRET=1` unless triton is already imported (the flag is read when triton's own
helpers are decorated, so it must precede the first `import triton`). That is how CPU tests
exercise the kernels.

Prior art: vLLM's `triton_unified_attention.py` and `triton_reshape_and_cache_flash.py`.
Left out: split-K decode for very long contexts, packing GQA groups in prefill, FP8 caches,
ALiBi and sliding windows.
"""
from __future__ import annotations

import os
import sys

import torch

INTERPRETED = not torch.cuda.is_available()
if INTERPRETED and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"    # read when triton.language defines its helpers

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

if INTERPRETED and not triton.knobs.runtime.interpret:
    raise ImportError("triton was imported without TRITON_INTERPRET=1 on a machine without CUDA; "
                      "set TRITON_INTERPRET=1 in the environment before anything imports triton")


@triton.jit
def _decode_kernel(out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, scale,
                   q_s, q_h, q_d, o_s, o_h, o_d, k_b, k_t, k_h, v_b, v_t, v_h, bt_s,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                   PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * q_s + heads[:, None] * q_h + dims[None, :] * q_d,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32) * scale
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * bt_s
    for start in range(0, seq_len, TILE):
        t = start + tl.arange(0, TILE)
        t_ok = t < seq_len
        block = tl.load(table + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        offset = (t % BLOCK_SIZE).to(tl.int64)
        kv_mask = t_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + block[:, None] * k_b + offset[:, None] * k_t + kv_head * k_h
                    + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + block[:, None] * v_b + offset[:, None] * v_t + kv_head * v_h
                    + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores = tl.where(t_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + seq * o_s + heads[:, None] * o_h + dims[None, :] * o_d,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _prefill_kernel(out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, query_start_loc_ptr,
                    seq_lens_ptr, scale,
                    q_t, q_h, q_d, o_t, o_h, o_d, k_b, k_t, k_h, v_b, v_t, v_h, bt_s,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr,
                    PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_head = head // GROUP
    i = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = i < query_len
    position = seq_len - query_len + i
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    tokens = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * q_t + head * q_h + dims[None, :] * q_d,
                mask=i_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32) * scale
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * bt_s
    # keys past the tile's last query position are invisible to every row of the tile
    kv_end = tl.minimum(seq_len, seq_len - query_len + (q_tile + 1) * BLOCK_M)
    for start in range(0, kv_end, TILE):
        t = start + tl.arange(0, TILE)
        t_ok = t < seq_len
        block = tl.load(table + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        offset = (t % BLOCK_SIZE).to(tl.int64)
        kv_mask = t_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + block[:, None] * k_b + offset[:, None] * k_t + kv_head * k_h
                    + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + block[:, None] * v_b + offset[:, None] * v_t + kv_head * v_h
                    + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        visible = t_ok[None, :] & (t[None, :] <= position[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + tokens[:, None] * o_t + head * o_h + dims[None, :] * o_d,
             out.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & dim_ok[None, :])


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                              k_t, k_h, k_d, v_t, v_h, v_d, kc_b, kc_t, kc_h, vc_b, vc_t, vc_h,
                              KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                              HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, DIM_PAD)
    mask = (heads < KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + token * k_t + heads[:, None] * k_h + dims[None, :] * k_d, mask=mask)
    v = tl.load(v_ptr + token * v_t + heads[:, None] * v_h + dims[None, :] * v_d, mask=mask)
    tl.store(k_cache_ptr + block * kc_b + offset * kc_t + heads[:, None] * kc_h + dims[None, :],
             k, mask=mask)
    tl.store(v_cache_ptr + block * vc_b + offset * vc_t + heads[:, None] * vc_h + dims[None, :],
             v, mask=mask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    return k_cache.stride()[:3] + v_cache.stride()[:3]


DECODE_TILE = 64
PREFILL_BLOCK_M = 16
PREFILL_TILE = 64


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    _decode_kernel[(num_seqs, kv_heads)](
        out, q, k_cache, v_cache, block_tables, seq_lens, float(scale),
        *q.stride(), *out.stride(), *_cache_strides(k_cache, v_cache), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        TILE=DECODE_TILE, PRECISION=_precision(q.dtype))
    return out


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    # one host read per step sizes the grid; programs past their sequence's queries exit
    max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    grid = (num_seqs, triton.cdiv(max_query_len, PREFILL_BLOCK_M), num_heads)
    _prefill_kernel[grid](
        out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, float(scale),
        *q.stride(), *out.stride(), *_cache_strides(k_cache, v_cache), block_tables.stride(0),
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        BLOCK_M=PREFILL_BLOCK_M, TILE=PREFILL_TILE, PRECISION=_precision(q.dtype))
    return out


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, *k.stride(), *v.stride(),
        *_cache_strides(k_cache, v_cache),
        KV_HEADS=kv_heads, HEADS_PAD=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1])
