"""GGUF Q8_0 blocks expanded to bfloat16 in place: how the streamed LM head becomes the weight
its matmul reads.

`expand_to_bf16_(buffer, blocks)`: the first `blocks` Q8_0 blocks of `buffer` (34 bytes each: an
f16 scale d, 32 int8 codes q) become, in the same buffer, the bfloat16 weights bf16(d * q), 64
bytes a block, exactly as `QuantWeight.dequantize()` followed by `.to(torch.bfloat16)` makes
them (csrc/q8_0_bf16.cpp says why that is exact and why walking the blocks backwards makes the
in-place expansion safe). The native library (built by scripts/setup.sh like the paged-attention
kernels) serves when it is built and current; otherwise `expand_to_bf16_torch_` does, giving
the same bits, a piece of blocks at a time from the last piece to the first (its temporaries
are one piece, not the buffer), and one log line says why.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from kernels.native_library import CSRC, NativeLibrary

__all__ = ["BLOCK", "IN_BYTES", "OUT_BYTES", "LIBRARY", "build", "extension", "expand_to_bf16_",
           "expand_to_bf16_torch_"]

BLOCK = 32                  # weights per Q8_0 block
IN_BYTES = 34               # f16 scale + 32 int8 codes
OUT_BYTES = 2 * BLOCK       # 32 bfloat16
TORCH_PIECE_BLOCKS = 2048   # blocks per piece on the torch path (~200 KiB of temporaries)

LIBRARY = NativeLibrary("kvmm_q8_0_cpu", CSRC / "q8_0_bf16.cpp", (), "native Q8_0 expansion",
                        "kernels.q8_0", "the LM head's Q8_0 blocks are expanded by torch")
build = LIBRARY.build           # compiles for this machine unless the library is current (setup.sh)


@functools.cache
def extension() -> ModuleType | str:
    """The loaded library, or why there is none (asked once per process; logged once)."""
    return LIBRARY.load()


def _check(buffer: torch.Tensor, blocks: int) -> None:
    if not (buffer.device.type == "cpu" and buffer.dtype == torch.uint8 and buffer.dim() == 1
            and buffer.is_contiguous()):
        raise ValueError("expand_to_bf16_ takes a contiguous 1-D uint8 CPU tensor")
    if blocks < 0 or blocks * OUT_BYTES > buffer.numel():
        raise ValueError(f"a buffer of {buffer.numel()} bytes cannot hold the bfloat16 form of "
                         f"{blocks} Q8_0 blocks ({blocks * OUT_BYTES} bytes)")


def expand_to_bf16_(buffer: torch.Tensor, blocks: int) -> torch.Tensor:
    """Expands in place; returns the bfloat16 weights as a view [blocks * 32] of `buffer`."""
    _check(buffer, blocks)
    native = extension()
    if isinstance(native, ModuleType):
        native.q8_0_to_bf16_inplace(buffer, blocks)
    else:
        expand_to_bf16_torch_(buffer, blocks)
    return buffer[:blocks * OUT_BYTES].view(torch.bfloat16)


def expand_to_bf16_torch_(buffer: torch.Tensor, blocks: int,
                          piece: int = TORCH_PIECE_BLOCKS) -> torch.Tensor:
    """The torch path: the same bits as the native one. Pieces go from last to first; piece
    [a, b)'s output [64a, 64b) overlaps only input blocks >= a, read before it is written."""
    _check(buffer, blocks)
    for a in range(-(-blocks // piece) * piece - piece, -1, -piece):
        b = min(a + piece, blocks)
        raw = buffer[a * IN_BYTES:b * IN_BYTES].view(b - a, IN_BYTES)
        d = raw[:, :2].contiguous().view(torch.float16).float()
        q = raw[:, 2:].contiguous().view(torch.int8).float()
        w = (q * d).to(torch.bfloat16)
        buffer[a * OUT_BYTES:b * OUT_BYTES].view(torch.bfloat16).copy_(w.reshape(-1))
    return buffer[:blocks * OUT_BYTES].view(torch.bfloat16)
