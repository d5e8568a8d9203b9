"""Q8_0 blocks expanded to bfloat16 in place: the native library and the torch path give the
bits of QuantWeight.dequantize() rounded to bfloat16 (the resident LM head), exactly.

The library is built here if scripts/setup.sh has not built it yet; the native tests skip with
the build's error when it cannot be built on this machine.
"""
from __future__ import annotations

import logging
from types import ModuleType

import numpy as np
import pytest
import torch

from kernels import q8_0
from kvmm_daemon.model.quant_linear import QuantWeight
from tests.kernels.conftest import built_or_skip


@pytest.fixture(scope="module")
def native() -> ModuleType:
    """The loaded extension (built first if missing or stale)."""
    return built_or_skip(q8_0)


def random_blocks(n: int, seed: int) -> torch.Tensor:
    """n Q8_0 blocks (uint8 [n * 34]) whose scales cover every kind of finite f16: zero, both
    signs, subnormals, the largest, and ordinary model-sized values; codes the full int8 range."""
    g = np.random.default_rng(seed)
    d = (g.standard_normal(n) * 0.01).astype(np.float16)
    special = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, -65504.0, 1.0], np.float16)
    d[:min(n, len(special))] = special[:n]
    q = g.integers(-128, 128, (n, 32), dtype=np.int8)
    return torch.from_numpy(np.concatenate([d.view(np.uint8).reshape(n, 2), q.view(np.uint8)], 1).reshape(-1))


def resident_bf16(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """What the resident engine holds: QuantWeight.dequantize() (float32) to bfloat16."""
    if n == 0:
        return torch.empty(0, dtype=torch.bfloat16)
    qw = QuantWeight.from_blocks("Q8_0", blocks.numpy(), (n, 32))
    return torch.from_numpy(qw.dequantize()).to(torch.bfloat16).reshape(-1)


def in_buffer(blocks: torch.Tensor, n: int, extra: int = 0) -> torch.Tensor:
    buf = torch.full((n * q8_0.OUT_BYTES + extra,), 0xA5, dtype=torch.uint8)
    buf[:blocks.numel()] = blocks
    return buf


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 1000, 2 * q8_0.TORCH_PIECE_BLOCKS + 5])
def test_native_and_torch_give_the_resident_bits(native, n):
    blocks = random_blocks(n, seed=n)
    want = resident_bf16(blocks, n).view(torch.int16)
    a, b = in_buffer(blocks, n, extra=64), in_buffer(blocks, n, extra=64)
    native.q8_0_to_bf16_inplace(a, n)
    q8_0.expand_to_bf16_torch_(b, n)
    assert torch.equal(a[:n * 64].view(torch.int16), want)
    assert torch.equal(b[:n * 64].view(torch.int16), want)
    assert (a[n * 64:] == 0xA5).all() and (b[n * 64:] == 0xA5).all()     # nothing past the output


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64])
def test_torch_path_pieces_do_not_change_the_bits(piece):
    n = 101
    blocks = random_blocks(n, seed=1)
    buf = in_buffer(blocks, n)
    q8_0.expand_to_bf16_torch_(buf, n, piece=piece)
    assert torch.equal(buf.view(torch.int16), resident_bf16(blocks, n).view(torch.int16))


def test_expand_returns_the_weights_as_a_view(native):
    blocks = random_blocks(40, seed=2)
    buf = in_buffer(blocks, 40)
    w = q8_0.expand_to_bf16_(buf, 40)
    assert w.dtype == torch.bfloat16 and w.numel() == 40 * 32
    assert w.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert torch.equal(w, resident_bf16(blocks, 40))


def test_a_buffer_too_small_is_refused_before_anything_is_written(native):
    blocks = random_blocks(4, seed=3)
    buf = in_buffer(blocks, 4)[:4 * 64 - 1].clone()
    before = buf.clone()
    with pytest.raises(ValueError, match="cannot hold the bfloat16 form of 4 Q8_0 blocks"):
        q8_0.expand_to_bf16_(buf, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        native.q8_0_to_bf16_inplace(buf, 4)
    with pytest.raises(ValueError, match="uint8"):
        q8_0.expand_to_bf16_(buf.view(torch.int8), 1)
    assert torch.equal(buf, before)


def test_without_the_library_torch_serves_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kvmm.kernels"):
        reason = q8_0.extension.__wrapped__()
    assert isinstance(reason, str) and "not built" in reason and "scripts/setup.sh" in reason
    assert [r.getMessage() for r in caplog.records] == [
        f"{reason}; the LM head's Q8_0 blocks are expanded by torch"]
    monkeypatch.setattr(q8_0, "extension", lambda: reason)
    blocks = random_blocks(9, seed=4)
    buf = in_buffer(blocks, 9)
    assert torch.equal(q8_0.expand_to_bf16_(buf, 9), resident_bf16(blocks, 9))
