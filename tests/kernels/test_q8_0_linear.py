"""x W^T straight from Q8_0 blocks: the native kernel against a float64 reference, the same bits
whatever the thread count, the batch and the rows around an output, and the torch path that
serves without the library.

The library is built here if scripts/setup.sh has not built it yet; the native tests skip with
the build's error when it cannot be built on this machine.
"""
from __future__ import annotations

import logging
from types import ModuleType

import numpy as np
import pytest
import torch

from kernels import q8_0_linear
from tests.kernels.conftest import built_or_skip
from tests.kernels.test_q8_0 import random_blocks


@pytest.fixture(scope="module")
def native() -> ModuleType:
    """The loaded extension (built first if missing or stale)."""
    return built_or_skip(q8_0_linear)


def matrix(n: int, k: int, seed: int) -> torch.Tensor:
    """An [n, k] Q8_0 matrix's blocks (random_blocks covers zero, subnormal and huge scales in
    its first blocks; the rest are model-sized)."""
    return random_blocks(n * k // 32, seed)


def reference(x: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """float64 x @ W^T, W = d * q exactly."""
    return x.double() @ q8_0_linear.dequantize(blocks, n, x.shape[1]).double().T


def bound(x: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """A float32 sum of K products has error <= K * eps * sum_k |x_k w_k| (Higham's bound,
    loosely); per output."""
    k = x.shape[1]
    mags = x.double().abs() @ q8_0_linear.dequantize(blocks, n, k).double().abs().T
    return k * 2.0 ** -24 * mags + 1e-30


@pytest.mark.parametrize("n,k,batch", [(1, 32, 1), (7, 64, 3), (17, 576, 5), (1792, 576, 1),
                                       (1792, 576, 16), (101, 96, 33), (4, 32, 4)])
def test_native_against_float64(native, n, k, batch):
    blocks = matrix(n, k, seed=n + k)
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch)) * 3
    y = native.q8_0_linear(x, blocks, n)
    assert y.shape == (batch, n) and y.dtype == torch.float32
    ref = reference(x, blocks, n)
    err = (y.double() - ref).abs()
    assert bool((err <= bound(x, blocks, n)).all()), f"max error {float(err.max()):.3g}"
    rel = float(err.max() / max(float(ref.abs().max()), 1e-30))   # n=1: the zero-scale block
    assert rel < 1e-6, f"relative error {rel:.3g}"


def test_the_bits_do_not_depend_on_threads_batch_or_rows_around(native):
    n, k = 1795, 576                      # odd: a tail of rows shorter than the kernel's tile
    blocks = matrix(n, k, seed=3)
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(3)) * 2
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.q8_0_linear(x, blocks, n)
        torch.set_num_threads(2)
        two = native.q8_0_linear(x, blocks, n)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    for b in range(x.shape[0]):             # a row of the batch alone
        assert torch.equal(native.q8_0_linear(x[b:b + 1].contiguous(), blocks, n)[0], two[b])
    for b0, b1 in [(0, 3), (3, 10), (10, 19)]:
        assert torch.equal(native.q8_0_linear(x[b0:b1].contiguous(), blocks, n), two[b0:b1])
    row = k // 32 * 34                      # rows of the matrix alone and in odd chunks
    for r0, r1 in [(0, 1), (5, 6), (1, 1794), (1790, 1795), (333, 1001)]:
        part = native.q8_0_linear(x, blocks[r0 * row:r1 * row].contiguous(), r1 - r0)
        assert torch.equal(part, two[:, r0:r1])


def test_empty_and_bad_arguments(native):
    blocks = matrix(3, 64, seed=5)
    assert q8_0_linear.q8_0_linear(torch.zeros(0, 64), blocks, 3).shape == (0, 3)
    assert q8_0_linear.q8_0_linear(torch.zeros(2, 64), blocks[:0], 0).shape == (2, 0)
    with pytest.raises(ValueError, match="not 4 rows of 2 Q8_0 blocks"):
        q8_0_linear.q8_0_linear(torch.zeros(1, 64), blocks, 4)
    with pytest.raises(ValueError, match="not 4 rows"):
        native.q8_0_linear(torch.zeros(1, 64), blocks, 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        q8_0_linear.q8_0_linear(torch.zeros(1, 48), blocks, 3)
    with pytest.raises(ValueError, match="float32"):
        q8_0_linear.q8_0_linear(torch.zeros(1, 64, dtype=torch.bfloat16), blocks, 3)
    with pytest.raises(ValueError, match="float32"):
        native.q8_0_linear(torch.zeros(64, 2).T, blocks, 3)


def test_without_the_library_torch_serves_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kvmm.kernels"):
        reason = q8_0_linear.extension.__wrapped__()
    assert isinstance(reason, str) and "not built" in reason and "scripts/setup.sh" in reason
    assert [r.getMessage() for r in caplog.records] == [
        f"{reason}; the LM head's Q8_0 blocks are dequantized and multiplied by torch"]
    monkeypatch.setattr(q8_0_linear, "extension", lambda: reason)
    n, k = 37, 96
    blocks = matrix(n, k, seed=6)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(6))
    y = q8_0_linear.q8_0_linear(x, blocks, n)
    assert torch.equal(y, q8_0_linear.q8_0_linear_torch(x, blocks, n))
    ref = reference(x, blocks, n)
    assert bool(((y.double() - ref).abs() <= bound(x, blocks, n)).all())


def test_dequantize_gives_the_float32_weights():
    from kvmm_daemon.model.quant_linear import QuantWeight
    blocks = matrix(5, 64, seed=7)
    qw = QuantWeight.from_blocks("Q8_0", blocks.numpy(), (5, 64))
    assert np.array_equal(q8_0_linear.dequantize(blocks, 5, 64).numpy(), qw.dequantize())
    assert torch.equal(qw.blocks(), blocks)
