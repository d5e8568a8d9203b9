"""The Triton kernels against the reference.

rel_err = max|a-b| / max|ref| <= 1e-5 in float32, 1e-2 in bfloat16, 2e-3 in float16.

Without CUDA they run in Triton's interpreter, which executes every program in Python
(TRITON_INTERPRET=1 must be set before triton is first imported: kernels.triton_paged does it,
and the conftest does it early as a backstop). The interpreter is slow, so contexts are short
(but span several tiles and blocks) and 16-bit dtypes get a few cases, not the full product.
"""
from __future__ import annotations

import pytest
import torch

from kernels import reference

try:
    from kernels import triton_paged
except ImportError as err:
    pytest.skip(f"kernels.triton_paged does not import: {err}", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (num_heads, num_kv_heads, block_size, head_dim, dtype): every GQA ratio x block size x head
# dim in float32, one bfloat16 case per GQA ratio, one float16 case
CASES = [pytest.param(h, kv, bs, d, torch.float32, id=f"gqa{h // kv}-bs{bs}-d{d}-f32")
         for h, kv in ((4, 4), (6, 2), (8, 1)) for bs in (1, 16, 32) for d in (64, 128)]
CASES += [pytest.param(h, kv, bs, d, torch.bfloat16, id=f"gqa{h // kv}-bs{bs}-d{d}-bf16")
          for h, kv, bs, d in ((4, 4, 32, 128), (9, 3, 16, 64), (8, 1, 1, 128))]
CASES += [pytest.param(6, 2, 16, 64, torch.float16, id="gqa3-bs16-d64-f16")]


@pytest.mark.parametrize("num_heads, num_kv_heads, block_size, head_dim, dtype", CASES)
def test_decode_matches_reference(make_case, check_close, num_heads, num_kv_heads,
                                  block_size, head_dim, dtype):
    case = make_case([1, 70, 33], num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, block_size=block_size, dtype=dtype, device=DEVICE)
    out = triton_paged.paged_attention_decode(*case.decode_args)
    check_close(out.cpu(), reference.paged_attention_decode(*case.decode_args).cpu())


@pytest.mark.parametrize("num_heads, num_kv_heads, block_size, head_dim, dtype", CASES)
def test_prefill_matches_reference(make_case, check_close, num_heads, num_kv_heads,
                                   block_size, head_dim, dtype):
    # no prefix (two query tiles), a cached prefix ending mid-block, a decode, nothing to do
    case = make_case([20, 45, 30, 6], query_lens=[20, 7, 1, 0], num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                     dtype=dtype, device=DEVICE)
    out = triton_paged.paged_attention_prefill(*case.prefill_args)
    check_close(out.cpu(), reference.paged_attention_prefill(*case.prefill_args).cpu())


def test_decode_reads_past_a_tile_with_a_strided_query(make_case, check_close):
    case = make_case([150, 64], num_heads=6, num_kv_heads=2, block_size=16, device=DEVICE)
    q = torch.randn(2, 10, 64, device=DEVICE)[:, 2:8]  # a strided view, as after a QKV split
    args = (q,) + case.decode_args[1:]
    check_close(triton_paged.paged_attention_decode(*args).cpu(),
                reference.paged_attention_decode(*args).cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_reshape_and_cache_matches_reference(make_case, block_size, dtype):
    case = make_case([40, 8], block_size=block_size, dtype=dtype, device=DEVICE)
    num_slots = case.k_cache.shape[0] * block_size
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(3))[:12]
    slots[[2, 7]] = -1
    kv = torch.randn(12, 2, 2, 64).to(dtype)         # k and v interleaved: strided token dim
    expected = case.arena.cpu().clone()
    reference.reshape_and_cache(kv[:, 0], kv[:, 1], *case.caches_of(expected), slots)
    kv, slots = kv.to(DEVICE), slots.to(DEVICE)
    triton_paged.reshape_and_cache(kv[:, 0], kv[:, 1], case.k_cache, case.v_cache, slots)
    assert torch.equal(case.arena.cpu(), expected)


def test_masked_positions_are_never_read(make_case, check_close):
    """NaN everywhere outside the sequences' contexts (block tails, spare blocks, what -1 would
    reach) leaves the result finite and equal to the reference."""
    case = make_case([21, 5], query_lens=[9, 1], num_heads=6, num_kv_heads=2, block_size=16,
                     device=DEVICE)
    expected_prefill = reference.paged_attention_prefill(*case.prefill_args).cpu()
    decode = make_case([21, 5], num_heads=6, num_kv_heads=2, block_size=16, device=DEVICE)
    expected_decode = reference.paged_attention_decode(*decode.decode_args).cpu()
    for c in (case, decode):
        keep = torch.zeros(c.k_cache.shape[:2], dtype=torch.bool)
        for s, n in enumerate(c.seq_lens.tolist()):
            for t in range(n):
                keep[int(c.block_tables[s, t // 16]), t % 16] = True
        for cache in (c.k_cache, c.v_cache):
            cache[~keep.to(DEVICE)] = float("nan")
    check_close(triton_paged.paged_attention_prefill(*case.prefill_args).cpu(), expected_prefill)
    check_close(triton_paged.paged_attention_decode(*decode.decode_args).cpu(), expected_decode)
