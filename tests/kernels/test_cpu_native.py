"""The native CPU kernels against the reference, and how the library is found and loaded.

rel_err = max|a-b| / max|ref| <= 1e-5 in float32, 1e-2 in bfloat16 (conftest). The library is
built here if scripts/setup.sh has not built it yet; the tests skip with the build's error when
it cannot be built on this machine.
"""
from __future__ import annotations

import logging
import os
from types import ModuleType

import pytest
import torch

from kernels import cpu_native, reference, torch_paged
from tests.kernels.conftest import built_or_skip

HEADS = [(4, 4), (6, 2), (8, 1)]                  # GQA ratios 1, 3, 8
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def native() -> ModuleType:
    """The loaded extension (built first if missing or stale)."""
    return built_or_skip(cpu_native)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("heads", HEADS)
def test_decode_matches_reference(native, make_case, check_close, heads, block_size, head_dim,
                                  dtype):
    case = make_case([1, 37, 70, 16], num_heads=heads[0], num_kv_heads=heads[1],
                     head_dim=head_dim, block_size=block_size, dtype=dtype,
                     seed=block_size + head_dim)
    out = native.paged_attention_decode(*case.decode_args)
    check_close(out, reference.paged_attention_decode(*case.decode_args))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_across_chunk_and_tile_edges(native, make_case, check_close, dtype):
    # 128 tokens make one softmax chunk; 129 and 300 start new ones; 2 and 5 end mid-tile;
    # head_dim 96 has no compile-time specialization
    case = make_case([128, 129, 300, 2, 5], num_heads=9, num_kv_heads=3, head_dim=96,
                     block_size=16, dtype=dtype, seed=7)
    out = native.paged_attention_decode(*case.decode_args)
    check_close(out, reference.paged_attention_decode(*case.decode_args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_major", [False, True])
def test_decode_on_scattered_blocks_of_either_arena_layout(native, make_case, check_close,
                                                           block_major, dtype):
    # the engine's layer-major arena and the block-major one (any block stride): shuffled
    # blocks, contexts that end inside the prefetch distance and exactly on block edges
    case = make_case([1, 15, 16, 17, 33, 160, 400], num_heads=9, num_kv_heads=3,
                     block_size=16, dtype=dtype, seed=11, num_layers=4, layer=2,
                     block_major=block_major)
    out = native.paged_attention_decode(*case.decode_args)
    check_close(out, reference.paged_attention_decode(*case.decode_args))
    # the same data in order in a compact buffer with the identity table: the same result
    ids = torch.cat([case.block_tables[s, :-(-n // 16)]
                     for s, n in enumerate(case.seq_lens.tolist())]).long()
    k, v = case.k_cache[ids].contiguous(), case.v_cache[ids].contiguous()
    table = torch.full_like(case.block_tables, -1)
    at = 0
    for s, n in enumerate(case.seq_lens.tolist()):
        table[s, :-(-n // 16)] = torch.arange(at, at - (-n // 16), dtype=torch.int32)
        at -= -n // 16
    assert torch.equal(native.paged_attention_decode(case.q, k, v, table, case.seq_lens,
                                                     case.scale), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_split_over_threads_matches_reference(native, make_case, check_close, dtype):
    # the context is cut into splits merged by log-sum-exp; splits of the 3-token sequence
    # are empty
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert native.decode_splits(2, 2000, 2003) > 1 and native.decode_splits(1, 2000, 2000) > 1
        # a call of more than one task's worth of rows (512) wakes the second thread
        assert native.decode_splits(1, 256, 768) > 1 and native.decode_splits(1, 256, 512) == 1
        case = make_case([2000, 3], num_heads=4, num_kv_heads=1, block_size=16, dtype=dtype)
        out = native.paged_attention_decode(*case.decode_args)
        check_close(out, reference.paged_attention_decode(*case.decode_args))
        single = native.paged_attention_decode(case.q[:1], case.k_cache, case.v_cache,
                                               case.block_tables[:1], case.seq_lens[:1],
                                               case.scale)
        check_close(single, out[:1])
    finally:
        torch.set_num_threads(threads)


def test_decode_never_reads_outside_the_context(native, make_case, check_close):
    case = make_case([37, 70, 5], num_heads=6, num_kv_heads=2, block_size=16, spare_blocks=4)
    expected = reference.paged_attention_decode(*case.decode_args)
    used = set(case.block_tables[case.block_tables >= 0].tolist())
    for block in range(case.k_cache.shape[0]):
        rows = slice(None) if block not in used else slice(None, 0)
        case.k_cache[block, rows] = float("nan")         # spare blocks: all NaN
        case.v_cache[block, rows] = float("nan")
    for s, n in enumerate(case.seq_lens.tolist()):       # and each last block past its tokens
        last = int(case.block_tables[s, (n - 1) // 16])
        case.k_cache[last, (n - 1) % 16 + 1:] = float("nan")
        case.v_cache[last, (n - 1) % 16 + 1:] = float("nan")
    check_close(native.paged_attention_decode(*case.decode_args), expected)


def test_decode_accepts_a_strided_query(native, make_case, check_close):
    case = make_case([12, 3], num_heads=6, num_kv_heads=2)
    qkv = torch.randn(2, 6 + 2 + 2, 64)
    args = (qkv[:, :6],) + case.decode_args[1:]          # a view, as after a fused QKV split
    check_close(native.paged_attention_decode(*args), reference.paged_attention_decode(*args))


@pytest.mark.parametrize("change, match", [
    (lambda c: {"seq_lens": torch.tensor([20, 0], dtype=torch.int32)}, r"seq_lens\[1\] = 0"),
    (lambda c: {"seq_lens": torch.tensor([20, 99], dtype=torch.int32)}, "columns"),
    (lambda c: {"seq_lens": torch.tensor([20, 9], dtype=torch.int32)},
     r"block_tables\[1, 1\] = -1"),
])
def test_decode_refuses_bad_metadata_itself(native, make_case, change, match):
    case = make_case([20, 7], num_heads=6, num_kv_heads=2, block_size=8)
    args = dict(zip(("q", "k_cache", "v_cache", "block_tables", "seq_lens", "scale"),
                    case.decode_args))
    args.update(change(case))
    with pytest.raises(ValueError, match=match):
        native.paged_attention_decode(*args.values())


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_reshape_and_cache_matches_reference(native, make_case, block_size, dtype):
    case = make_case([40, 8], block_size=block_size, dtype=dtype)
    num_slots = case.k_cache.shape[0] * block_size
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(3))[:12]
    slots[[2, 7]] = -1
    kv = torch.randn(12, 2, 2, 64).to(dtype)             # k and v interleaved: strided token dim
    k, v = kv[:, 0], kv[:, 1]
    expected = case.arena.clone()
    reference.reshape_and_cache(k, v, *case.caches_of(expected), slots)
    native.reshape_and_cache(k, v, case.k_cache, case.v_cache, slots.to(torch.int32))
    assert torch.equal(case.arena, expected)


def test_reshape_and_cache_refuses_a_bad_slot_before_writing(native, make_case):
    case = make_case([10])
    before = case.arena.clone()
    k = torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match=r"slot_mapping\[2\] = 10000"):
        native.reshape_and_cache(k, k, case.k_cache, case.v_cache, torch.tensor([0, 1, 10_000]))
    assert torch.equal(case.arena, before)


def test_prefill_runs_single_queries_natively_and_longer_runs_on_torch(
        native, make_case, check_close, monkeypatch):
    torch_calls = []
    for name in ("paged_attention_decode", "paged_attention_prefill"):
        original = getattr(torch_paged, name)
        monkeypatch.setattr(torch_paged, name,
                            lambda *a, _n=name, _o=original: torch_calls.append(_n) or _o(*a))
    case = make_case([5, 33], query_lens=[1, 1])
    check_close(cpu_native.paged_attention_prefill(*case.prefill_args),
                reference.paged_attention_prefill(*case.prefill_args))
    assert torch_calls == []
    # a prefill from scratch, a decode, a run after a cached prefix, nothing to do, a decode
    case = make_case([24, 50, 9, 4, 17], query_lens=[24, 1, 3, 0, 1], num_heads=9,
                     num_kv_heads=3)
    check_close(cpu_native.paged_attention_prefill(*case.prefill_args),
                reference.paged_attention_prefill(*case.prefill_args))
    assert torch_calls == ["paged_attention_prefill"] * 2
    torch_calls.clear()
    case = make_case([1, 37], dtype=torch.float16)
    check_close(cpu_native.paged_attention_decode(*case.decode_args),
                reference.paged_attention_decode(*case.decode_args))
    assert torch_calls == ["paged_attention_decode"]


def _fresh_load(monkeypatch, tmp_path, caplog) -> str:
    """extension() with an empty extensions dir, bypassing the per-process cache."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kvmm.kernels"):
        reason = cpu_native.extension.__wrapped__()
    assert isinstance(reason, str)
    assert [r.getMessage() for r in caplog.records] == [f"{reason}; the torch path serves CPU "
                                                        f"tensors"]
    return reason


def test_missing_library_is_one_log_line(monkeypatch, tmp_path, caplog):
    reason = _fresh_load(monkeypatch, tmp_path, caplog)
    assert "not built" in reason and "scripts/setup.sh" in reason


def test_library_older_than_its_source_is_not_loaded(monkeypatch, tmp_path, caplog):
    library = tmp_path / cpu_native.EXTENSION_NAME / f"{cpu_native.EXTENSION_NAME}.so"
    library.parent.mkdir()
    library.write_bytes(b"")
    source_time = cpu_native.SOURCE.stat().st_mtime
    os.utime(library, (source_time - 10, source_time - 10))
    assert "out of date" in _fresh_load(monkeypatch, tmp_path, caplog)


def test_library_that_does_not_load_is_reported(monkeypatch, tmp_path, caplog):
    library = tmp_path / cpu_native.EXTENSION_NAME / f"{cpu_native.EXTENSION_NAME}.so"
    library.parent.mkdir()
    library.write_bytes(b"not an ELF file")
    assert "do not load" in _fresh_load(monkeypatch, tmp_path, caplog)
