"""The PyTorch path against the reference.

rel_err = max|a-b| / max|ref| <= 1e-5 in float32, 1e-2 in bfloat16, 2e-3 in float16.
"""
from __future__ import annotations

import pytest
import torch

from kernels import reference, torch_paged

HEADS = [(4, 4), (6, 2), (8, 1)]                  # GQA ratios 1, 3, 8
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("heads", HEADS)
def test_decode_matches_reference(make_case, check_close, heads, block_size, head_dim, dtype):
    case = make_case([1, 37, 70, 16], num_heads=heads[0], num_kv_heads=heads[1],
                     head_dim=head_dim, block_size=block_size, dtype=dtype,
                     seed=block_size + head_dim)
    out = torch_paged.paged_attention_decode(*case.decode_args)
    check_close(out, reference.paged_attention_decode(*case.decode_args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("heads", HEADS)
def test_prefill_matches_reference(make_case, check_close, heads, block_size, head_dim, dtype):
    # no prefix, a cached prefix, a decode mixed in, a prefix ending mid-block, nothing to do
    case = make_case([24, 50, 40, 17, 9], query_lens=[24, 13, 1, 5, 0], num_heads=heads[0],
                     num_kv_heads=heads[1], head_dim=head_dim, block_size=block_size,
                     dtype=dtype, seed=block_size * head_dim)
    out = torch_paged.paged_attention_prefill(*case.prefill_args)
    check_close(out, reference.paged_attention_prefill(*case.prefill_args))


def test_decode_in_chunks_of_sequences_matches_reference(make_case, check_close, monkeypatch):
    case = make_case([1, 37, 70, 16, 50], num_heads=9, num_kv_heads=3)
    # 70 tokens x 3 heads x 64 dims x 4 bytes x (K, V) per sequence: two sequences a chunk
    monkeypatch.setattr(torch_paged, "GATHER_CHUNK_BYTES", 2 * 70 * 3 * 64 * 4 * 2)
    out = torch_paged.paged_attention_decode(*case.decode_args)
    check_close(out, reference.paged_attention_decode(*case.decode_args))


def test_float16_matches_reference(make_case, check_close):
    case = make_case([24, 50, 40], query_lens=[24, 13, 1], dtype=torch.float16)
    check_close(torch_paged.paged_attention_prefill(*case.prefill_args),
                reference.paged_attention_prefill(*case.prefill_args))
    case = make_case([1, 37, 70], dtype=torch.float16)
    check_close(torch_paged.paged_attention_decode(*case.decode_args),
                reference.paged_attention_decode(*case.decode_args))


def test_prefill_of_only_single_queries_is_decode(make_case, check_close):
    case = make_case([5, 33], query_lens=[1, 1])
    out = torch_paged.paged_attention_prefill(*case.prefill_args)
    check_close(out, torch_paged.paged_attention_decode(*case.decode_args))


def test_decode_accepts_a_strided_query(make_case, check_close):
    case = make_case([12, 3], num_heads=6, num_kv_heads=2)
    qkv = torch.randn(2, 6 + 2 + 2, 64)
    q = qkv[:, :6]                                   # a view, as after a fused QKV split
    args = (q,) + case.decode_args[1:]
    check_close(torch_paged.paged_attention_decode(*args), reference.paged_attention_decode(*args))


def test_contiguous_baseline_equals_paged_decode(make_case, check_close):
    case = make_case([9, 40, 23], num_heads=9, num_kv_heads=3, block_size=16)
    lengths = case.seq_lens.tolist()
    k = torch.zeros(3, max(lengths), 3, 64)
    v = torch.zeros(3, max(lengths), 3, 64)
    for s, n in enumerate(lengths):
        k[s, :n] = reference.gather_context(case.k_cache, case.block_tables[s], n)
        v[s, :n] = reference.gather_context(case.v_cache, case.block_tables[s], n)
    baseline = torch_paged.contiguous_decode_sdpa(case.q, k, v, case.seq_lens, case.scale)
    check_close(baseline, torch_paged.paged_attention_decode(*case.decode_args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16])
def test_reshape_and_cache_matches_reference(make_case, block_size, dtype):
    case = make_case([40, 8], block_size=block_size, dtype=dtype)
    num_slots = case.k_cache.shape[0] * block_size
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(3))[:12]
    slots[[2, 7]] = -1
    kv = torch.randn(12, 2, 2, 64).to(dtype)         # k and v interleaved: strided token dim
    k, v = kv[:, 0], kv[:, 1]
    expected = case.arena.clone()
    reference.reshape_and_cache(k, v, *case.caches_of(expected), slots)
    torch_paged.reshape_and_cache(k, v, case.k_cache, case.v_cache, slots)
    assert torch.equal(case.arena, expected)


def test_reshape_and_cache_with_every_slot_skipped_changes_nothing(make_case):
    case = make_case([10])
    before = case.arena.clone()
    k = torch.randn(3, 2, 64)
    torch_paged.reshape_and_cache(k, k, case.k_cache, case.v_cache, torch.full((3,), -1))
    assert torch.equal(case.arena, before)
