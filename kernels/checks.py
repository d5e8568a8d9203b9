"""Argument checks shared by every paged-attention backend.

The public wrappers in `kernels/__init__.py` call these before dispatching, so each backend
may assume well-formed input. Two kinds of check:

- *layout checks* read only shapes, dtypes, strides and devices; they are cheap and always run.
- *value checks* read the metadata tensors (block tables, lengths, slots). On CPU they cost
  10-15 us a call; a caller that validated the same metadata already (the model checks at its
  first layer, every layer shares the metadata) passes `values=False`. On CUDA they would
  force a device sync every layer, so they are skipped there (as in vLLM, whose kernels trust
  their metadata).

Every caller mistake raises ValueError (TypeError for a non-tensor) with a one-line message
naming the argument and the fix. The cache layout accepted is `[num_blocks, block_size,
num_kv_heads, head_dim]` with the three inner dims contiguous and any stride on the block
dim, so per-layer views `kv[l, :, 0]` of the KV arena pass unchanged.
"""
from __future__ import annotations

import math

import torch

ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def device_of(name: str, t: object) -> torch.device:
    """t's device; TypeError naming the argument when t is not a tensor."""
    return _tensor(name, t).device


def _ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {layout}")


def _dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {names}")


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Both caches [num_blocks, block_size, num_kv_heads, head_dim], same dtype/device,
    inner three dims contiguous."""
    _tensor("k_cache", k_cache)
    _tensor("v_cache", v_cache)
    _ndim("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape "
                         f"{tuple(k_cache.shape)}; pass the K and V views of the same layer")
    _dtype("k_cache", k_cache, ATTENTION_DTYPES)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} differs from k_cache dtype "
                         f"{k_cache.dtype}")
    if v_cache.device != k_cache.device:
        raise ValueError(f"v_cache is on {v_cache.device} but k_cache on {k_cache.device}")
    _, block_size, kv_heads, head_dim = k_cache.shape
    if min(k_cache.shape) < 1:
        raise ValueError(f"k_cache has an empty dimension {tuple(k_cache.shape)}; allocate at "
                         f"least one block")
    inner = (kv_heads * head_dim, head_dim, 1)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        # the stride of a dim of size 1 is never used to address anything
        if any(size > 1 and c.stride(dim) != want
               for dim, size, want in zip((1, 2, 3), c.shape[1:], inner)):
            raise ValueError(f"{name} strides {c.stride()} are not contiguous in the inner "
                             f"[block_size, num_kv_heads, head_dim] dims; use a view "
                             f"kv[layer, :, 0|1] of a contiguous arena")


def _check_query(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    _tensor("q", q)
    _ndim("q", q, 3, "[tokens, num_heads, head_dim]")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from the cache dtype {k_cache.dtype}; "
                         f"cast q to the cache dtype")
    if q.device != k_cache.device:
        raise ValueError(f"q is on {q.device} but the cache on {k_cache.device}")
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    if head_dim != k_cache.shape[3]:
        raise ValueError(f"q head_dim {head_dim} differs from the cache head_dim "
                         f"{k_cache.shape[3]}")
    if heads % kv_heads != 0:
        raise ValueError(f"q has {heads} heads, not a multiple of the cache's {kv_heads} KV heads")


def _check_scale(scale: float) -> None:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale {scale!r} must be a positive finite float, usually "
                         f"head_dim ** -0.5")


def _check_metadata(block_tables: torch.Tensor, seq_lens: torch.Tensor, num_seqs: int,
                    device: torch.device) -> None:
    _tensor("block_tables", block_tables)
    _tensor("seq_lens", seq_lens)
    _ndim("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    _ndim("seq_lens", seq_lens, 1, "[num_seqs]")
    _dtype("block_tables", block_tables, (torch.int32,))
    _dtype("seq_lens", seq_lens, (torch.int32,))
    if block_tables.shape[0] != num_seqs or seq_lens.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows and seq_lens "
                         f"{seq_lens.shape[0]} entries; expected one per sequence ({num_seqs})")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the cache on {device}")


def _check_block_values(k_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, lengths: list[int]) -> None:
    """Every block a sequence's context touches is a valid block id (never -1).

    Runs on every layer of every step, so the common case is a few small tensor ops."""
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    longest = max(lengths, default=0)
    needed = -(-longest // block_size)
    if needed > block_tables.shape[1]:
        raise ValueError(f"a sequence of {longest} tokens needs {needed} blocks of {block_size} "
                         f"but block_tables has {block_tables.shape[1]} columns; widen "
                         f"block_tables")
    if needed == 0:
        return
    ids = block_tables[:, :needed]
    used = None                                      # None: every sequence uses every column
    if -(-min(lengths) // block_size) < needed:
        first_token = torch.arange(0, needed * block_size, block_size, dtype=seq_lens.dtype)
        used = first_token[None, :] < seq_lens[:, None]
    lowest, highest = torch.aminmax(ids if used is None else torch.where(used, ids, 0))
    if int(lowest) >= 0 and int(highest) < num_blocks:
        return
    used = torch.ones_like(ids, dtype=torch.bool) if used is None else used
    seq, col = (int(x) for x in (used & ((ids < 0) | (ids >= num_blocks))).nonzero()[0])
    raise ValueError(f"block_tables[{seq}, {col}] = {int(ids[seq, col])} lies inside the "
                     f"sequence's {int(seq_lens[seq])} tokens but is not a block id in "
                     f"[0, {num_blocks}); fill the table before the kernel runs")


def check_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, *, values=True) -> None:
    check_cache_pair(k_cache, v_cache)
    _check_query(q, k_cache)
    _check_metadata(block_tables, seq_lens, q.shape[0], k_cache.device)
    _check_scale(scale)
    if values and k_cache.device.type == "cpu" and q.shape[0] > 0:
        lengths = seq_lens.tolist()
        if min(lengths) < 1:
            raise ValueError(f"seq_lens has an entry {min(lengths)} < 1; a decoding sequence "
                             f"holds at least its new token")
        _check_block_values(k_cache, block_tables, seq_lens, lengths)


def check_prefill(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, *,
                  values=True) -> None:
    check_cache_pair(k_cache, v_cache)
    _check_query(q, k_cache)
    _tensor("query_start_loc", query_start_loc)
    num_seqs = query_start_loc.shape[0] - 1 if query_start_loc.dim() == 1 else -1
    if num_seqs < 0:
        raise ValueError(f"query_start_loc has shape {tuple(query_start_loc.shape)}; expected "
                         f"[num_seqs + 1]")
    _dtype("query_start_loc", query_start_loc, (torch.int32,))
    if query_start_loc.device != k_cache.device:
        raise ValueError(f"query_start_loc is on {query_start_loc.device} but the cache on "
                         f"{k_cache.device}")
    _check_metadata(block_tables, seq_lens, num_seqs, k_cache.device)
    _check_scale(scale)
    if not values or k_cache.device.type != "cpu" or num_seqs == 0:
        return
    starts, lengths = query_start_loc.tolist(), seq_lens.tolist()
    if starts[0] != 0 or starts[-1] != q.shape[0]:
        raise ValueError(f"query_start_loc runs from {starts[0]} to {starts[-1]}; it must run "
                         f"from 0 to the {q.shape[0]} query tokens")
    for s, seq_len in enumerate(lengths):
        query_len = starts[s + 1] - starts[s]
        if query_len < 0:
            raise ValueError("query_start_loc decreases; it must be the running sum of query "
                             "lengths")
        if query_len > seq_len:
            raise ValueError(f"sequence {s} has {query_len} query tokens but seq_lens {seq_len}; "
                             f"seq_lens counts the cached prefix plus the queries")
    _check_block_values(k_cache, block_tables, seq_lens, lengths)


def check_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping, *, values=True) -> None:
    check_cache_pair(k_cache, v_cache)
    _tensor("k", k)
    _tensor("v", v)
    _tensor("slot_mapping", slot_mapping)
    _ndim("k", k, 3, "[num_tokens, num_kv_heads, head_dim]")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k has [num_kv_heads, head_dim] = {list(k.shape[1:])} but the cache "
                         f"{list(k_cache.shape[2:])}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from the cache dtype "
                             f"{k_cache.dtype}; cast it to the cache dtype")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache on {k_cache.device}")
    _ndim("slot_mapping", slot_mapping, 1, "[num_tokens]")
    _dtype("slot_mapping", slot_mapping, (torch.int64, torch.int32))
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} slots for {k.shape[0]} tokens")
    if slot_mapping.device != k_cache.device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device} but the cache on "
                         f"{k_cache.device}")
    if values and k_cache.device.type == "cpu" and k.shape[0] > 0:
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        top, bottom = int(slot_mapping.max()), int(slot_mapping.min())
        if top >= num_slots or bottom < -1:
            bad = top if top >= num_slots else bottom
            raise ValueError(f"slot_mapping holds {bad}, outside [-1, {num_slots}) for a cache of "
                             f"{k_cache.shape[0]} blocks of {k_cache.shape[1]}")
