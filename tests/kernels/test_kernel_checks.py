"""Caller mistakes at the public entry points raise ValueError/TypeError naming the culprit.

Every test runs on the torch path and on the default choice (the native kernels when built,
which find bad metadata themselves and then report it with the same messages)."""
from __future__ import annotations

import pytest
import torch

import kernels


@pytest.fixture(autouse=True, params=["torch", "auto"])
def backend(request, monkeypatch):
    monkeypatch.setenv(kernels.KERNEL_ENV, request.param)
    return request.param


@pytest.fixture
def case(make_case):
    return make_case([20, 7], query_lens=[5, 7], num_heads=6, num_kv_heads=2, block_size=8)


def _decode(case, **changes):
    args = dict(q=case.q[:2], k_cache=case.k_cache, v_cache=case.v_cache,
                block_tables=case.block_tables, seq_lens=case.seq_lens, scale=case.scale)
    args.update(changes)
    return kernels.paged_attention_decode(**args)


def _prefill(case, **changes):
    args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache,
                block_tables=case.block_tables, query_start_loc=case.query_start_loc,
                seq_lens=case.seq_lens, scale=case.scale)
    args.update(changes)
    return kernels.paged_attention_prefill(**args)


def test_well_formed_calls_pass(case):
    assert _decode(case).shape == (2, 6, 64)
    assert _prefill(case).shape == (12, 6, 64)


@pytest.mark.parametrize("change, match", [
    (lambda c: {"q": c.q[:2].double()}, "q dtype"),
    (lambda c: {"q": c.q[:2, :5]}, "not a multiple"),
    (lambda c: {"q": c.q[:2, :, :32]}, "head_dim"),
    (lambda c: {"q": c.q[:3]}, "one per sequence"),
    (lambda c: {"q": c.q[0]}, "q has shape"),
    (lambda c: {"v_cache": c.v_cache[:-1]}, "v_cache shape"),
    (lambda c: {"v_cache": c.v_cache.to(torch.bfloat16)}, "v_cache dtype"),
    (lambda c: {"k_cache": c.k_cache.transpose(1, 2),
                "v_cache": c.v_cache.transpose(1, 2)}, "not contiguous in the inner"),
    (lambda c: {"k_cache": c.k_cache.long(), "v_cache": c.v_cache.long()}, "k_cache has dtype"),
    (lambda c: {"block_tables": c.block_tables.long()}, "block_tables has dtype"),
    (lambda c: {"seq_lens": c.seq_lens.long()}, "seq_lens has dtype"),
    (lambda c: {"seq_lens": torch.tensor([20, 0], dtype=torch.int32)}, "< 1"),
    (lambda c: {"seq_lens": torch.tensor([20, 99], dtype=torch.int32)}, "widen block_tables"),
    (lambda c: {"seq_lens": torch.tensor([20, 9], dtype=torch.int32)},
     r"block_tables\[1, 1\] = -1"),
    (lambda c: {"scale": 0.0}, "scale"),
    (lambda c: {"scale": float("nan")}, "scale"),
])
def test_decode_rejects(case, change, match):
    with pytest.raises(ValueError, match=match):
        _decode(case, **change(case))


def test_decode_rejects_a_block_id_past_the_cache(case):
    tables = case.block_tables.clone()
    tables[0, 0] = case.k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_tables\[0, 0\]"):
        _decode(case, block_tables=tables)


def test_non_tensor_is_a_type_error(case):
    with pytest.raises(TypeError, match="seq_lens must be a torch.Tensor"):
        _decode(case, seq_lens=[20, 7])


@pytest.mark.parametrize("starts, match", [
    ([0, 5, 11], "run from 0 to the 12"),
    ([1, 5, 12], "run from 0 to the 12"),
    ([0, 13, 12], "decreases"),
    ([0, 1, 12], "11 query tokens but seq_lens 7"),
])
def test_prefill_rejects_bad_query_start_loc(case, starts, match):
    with pytest.raises(ValueError, match=match):
        _prefill(case, query_start_loc=torch.tensor(starts, dtype=torch.int32))


def test_prefill_rejects_a_query_start_loc_of_the_wrong_length(case):
    with pytest.raises(ValueError, match="one per sequence"):
        _prefill(case, query_start_loc=torch.tensor([0, 12], dtype=torch.int32))


def _write(case, k=None, slots=None):
    k = torch.randn(3, 2, 64) if k is None else k
    slots = torch.tensor([0, -1, 5]) if slots is None else slots
    kernels.reshape_and_cache(k, k, case.k_cache, case.v_cache, slots)


def test_reshape_and_cache_accepts_int32_slots_and_skips_minus_one(case):
    before = case.arena.clone()
    k = torch.randn(3, 2, 64)
    _write(case, k=k, slots=torch.tensor([0, -1, 5], dtype=torch.int32))
    assert torch.equal(case.k_cache[0, 5], k[2]) and torch.equal(case.v_cache[0, 0], k[0])
    assert int((case.arena != before).flatten(4).any(-1).sum()) == 4    # 2 slots x (K, V)


@pytest.mark.parametrize("change, match", [
    ({"k": torch.randn(3, 2, 32)}, r"\[num_kv_heads, head_dim\]"),
    ({"k": torch.randn(3, 2, 64).double()}, "k dtype"),
    ({"slots": torch.tensor([0, 1])}, "2 slots for 3 tokens"),
    ({"slots": torch.tensor([0.0, 1.0, 2.0])}, "slot_mapping has dtype"),
    ({"slots": torch.tensor([0, -2, 1])}, "holds -2"),
    ({"slots": torch.tensor([0, 1, 10_000])}, "holds 10000"),
])
def test_reshape_and_cache_rejects(case, change, match):
    with pytest.raises(ValueError, match=match):
        _write(case, **change)
