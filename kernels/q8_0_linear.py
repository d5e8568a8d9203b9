"""The product of float32 activations and a matrix held as GGUF Q8_0 blocks: the LM head.

`q8_0_linear(x, blocks, n)`: x float32 [B, K], `blocks` the uint8 bytes of an [n, K] Q8_0 matrix
row by row (34 bytes a block: an f16 scale d, 32 int8 codes q; w = d * q), returns float32
[B, n] = x W^T. The native library (csrc/q8_0_linear.cpp, built by scripts/setup.sh like the
other kernels) multiplies the exact float32 weights in a fixed order per output, so each output
is the same bits whatever the thread count, the batch or the rows around it: a chunk of rows
gives exactly the whole matrix's logits. Without it (not built, stale, not loadable; one log line
says why) `q8_0_linear_torch` serves: the blocks dequantized to float32 and one torch matmul,
close to the native result (both are float32 sums of the same exact products) but not the same
bits. The choice is made once per process, so every engine in it computes alike.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from kernels.native_library import CSRC, NativeLibrary

__all__ = ["BLOCK", "BLOCK_BYTES", "LIBRARY", "build", "extension", "q8_0_linear",
           "q8_0_linear_torch", "dequantize"]

BLOCK = 32                  # weights per Q8_0 block
BLOCK_BYTES = 34            # f16 scale + 32 int8 codes

LIBRARY = NativeLibrary("kvmm_q8_0_linear", CSRC / "q8_0_linear.cpp", (), "native Q8_0 linear",
                        "kernels.q8_0_linear",
                        "the LM head's Q8_0 blocks are dequantized and multiplied by torch")
build = LIBRARY.build           # compiles for this machine unless the library is current (setup.sh)


@functools.cache
def extension() -> ModuleType | str:
    """The loaded library, or why there is none (asked once per process; logged once)."""
    return LIBRARY.load()


def _check(x: torch.Tensor, blocks: torch.Tensor, n: int) -> None:
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()):
        raise ValueError("q8_0_linear takes x as a contiguous 2-D float32 CPU tensor")
    if not (blocks.device.type == "cpu" and blocks.dtype == torch.uint8 and blocks.dim() == 1
            and blocks.is_contiguous()):
        raise ValueError("q8_0_linear takes the blocks as a contiguous 1-D uint8 CPU tensor")
    k = x.shape[1]
    if k % BLOCK:
        raise ValueError(f"q8_0_linear needs K a multiple of {BLOCK}, not {k}")
    want = n * (k // BLOCK) * BLOCK_BYTES
    if n < 0 or blocks.numel() != want:
        raise ValueError(f"blocks of {blocks.numel()} bytes are not {n} rows of {k // BLOCK} "
                         f"Q8_0 blocks ({want} bytes)")


def q8_0_linear(x: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """x @ W^T, float32 [B, n], natively when the library is loaded, else by torch."""
    _check(x, blocks, n)
    native = extension()
    if isinstance(native, ModuleType):
        return native.q8_0_linear(x, blocks, n)
    return q8_0_linear_torch(x, blocks, n)


def dequantize(blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The float32 weights [n, k] (d * q, exact), as QuantWeight.dequantize() gives them."""
    raw = blocks.view(n, k // BLOCK, BLOCK_BYTES)
    d = raw[..., :2].contiguous().view(torch.float16).float()
    q = raw[..., 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(n, k)


def q8_0_linear_torch(x: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The torch path: the float32 weights and one matmul (not the native bits)."""
    _check(x, blocks, n)
    return x @ dequantize(blocks, n, x.shape[1]).T
