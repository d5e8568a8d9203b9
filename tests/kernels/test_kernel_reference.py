"""The reference itself, checked against dense float64 attention built independently."""
from __future__ import annotations

import torch

from kernels import reference


def _slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    t = torch.arange(seq_len)
    return block_table[t // block_size].long() * block_size + t % block_size


def test_decode_matches_dense_attention_of_unpaged_context(make_case):
    case = make_case([7, 40, 1, 33], num_heads=6, num_kv_heads=2, block_size=16)
    num_kv_heads, head_dim = case.k_cache.shape[2], case.k_cache.shape[3]
    gen = torch.Generator().manual_seed(1)
    for s, seq_len in enumerate(case.seq_lens.tolist()):
        keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        values = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        reference.reshape_and_cache(keys, values, case.k_cache, case.v_cache,
                                    _slots(case.block_tables[s], seq_len, 16))
        q = case.q[s].double()                                   # [H, D]
        k = keys.double().repeat_interleave(3, dim=1)            # [L, H, D]
        v = values.double().repeat_interleave(3, dim=1)
        weights = torch.exp((q[None] * k).sum(-1) * case.scale)  # [L, H]
        expected = (weights[..., None] * v).sum(0) / weights.sum(0)[:, None]
        out = reference.paged_attention_decode(*case.decode_args)
        assert torch.allclose(out[s].double(), expected, rtol=0, atol=1e-5)


def test_prefill_query_equals_decode_at_its_position(make_case):
    case = make_case([30, 19], query_lens=[12, 19], block_size=8, num_heads=4, num_kv_heads=4)
    out = reference.paged_attention_prefill(*case.prefill_args)
    starts = case.query_start_loc.tolist()
    for s, seq_len in enumerate(case.seq_lens.tolist()):
        query_len = starts[s + 1] - starts[s]
        for i in range(query_len):
            row = starts[s] + i
            visible = torch.tensor([seq_len - query_len + i + 1], dtype=torch.int32)
            alone = reference.paged_attention_decode(case.q[row:row + 1], case.k_cache,
                                                     case.v_cache, case.block_tables[s:s + 1],
                                                     visible, case.scale)
            assert torch.allclose(out[row], alone[0], rtol=0, atol=1e-6)


def test_reshape_and_cache_writes_slots_and_skips_minus_one(make_case):
    case = make_case([20], block_size=4)
    before = case.arena.clone()
    k = torch.randn(3, *case.k_cache.shape[2:])
    v = torch.randn(3, *case.k_cache.shape[2:])
    reference.reshape_and_cache(k, v, case.k_cache, case.v_cache, torch.tensor([9, -1, 2]))
    assert torch.equal(case.k_cache[2, 1], k[0]) and torch.equal(case.v_cache[0, 2], v[2])
    changed = (case.arena != before).flatten(2).any(-1).nonzero().tolist()
    assert sorted(changed) == [[1, 0], [1, 2]]      # (layer, block) pairs; layer 1 is the view
