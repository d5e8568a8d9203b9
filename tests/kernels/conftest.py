"""Random paged-attention inputs shared by the kernel tests.

A case lays its caches out like the engine does: per-layer views `kv[layer, :, 0|1]` of a
layer-major arena `[num_layers, num_blocks, 2, block_size, H_kv, D]` (block stride
2 * block_size * H_kv * D), or with `block_major=True` views `kv[:, layer, 0|1]` of
`[num_blocks, num_layers, 2, ...]` (the layout before, a longer block stride; kernels accept
any block stride); sequences own shuffled, non-adjacent blocks, block tables are -1 padded
past each sequence's blocks, and every unused cache position holds random values, so
reading a wrong or masked slot shows.

Error measure used by every test: rel_err(a, ref) = max|a - ref| / max|ref|, computed in
float32; bounds are 1e-5 for float32, 1e-2 for bfloat16 and 2e-3 for float16.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported; the triton tests need the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

def built_or_skip(owner) -> ModuleType:
    """`owner`'s loaded native library (kernels.cpu_native or kernels.q8_0), built first if it
    is missing or stale; skips with the build's error when this machine cannot build it."""
    if not isinstance(owner.extension(), ModuleType):
        try:
            owner.build()
        except Exception as err:                         # compiler, ninja or linker failure
            pytest.skip(f"{owner.LIBRARY.what} could not be built: {err}")
        owner.extension.cache_clear()
    module = owner.extension()
    if not isinstance(module, ModuleType):
        pytest.skip(module)
    return module


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|, in float32."""
    expected = expected.float()
    return float((actual.float() - expected).abs().max() / expected.abs().max())


@dataclass
class PagedCase:
    """Inputs of one kernel call. query_start_loc covers query_lens; seq_lens >= query_lens."""

    arena: torch.Tensor
    layer: int
    block_major: bool
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    q: torch.Tensor
    scale: float

    def caches_of(self, arena: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k_cache, v_cache) views of this case's layer in `arena` (e.g. a clone)."""
        if self.block_major:
            return arena[:, self.layer, 0], arena[:, self.layer, 1]
        return arena[self.layer, :, 0], arena[self.layer, :, 1]

    @property
    def decode_args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.scale)

    @property
    def prefill_args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc,
                self.seq_lens, self.scale)


def build_case(seq_lens: list[int], *, query_lens: list[int] | None = None, num_heads: int = 6,
               num_kv_heads: int = 2, head_dim: int = 64, block_size: int = 16,
               dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu",
               num_layers: int = 3, layer: int = 1, spare_blocks: int = 3,
               extra_columns: int = 2, block_major: bool = False) -> PagedCase:
    """A case with one query per sequence (decode) unless query_lens is given (prefill)."""
    gen = torch.Generator().manual_seed(seed)
    query_lens = [1] * len(seq_lens) if query_lens is None else query_lens
    assert len(query_lens) == len(seq_lens)
    assert all(0 <= q <= s for q, s in zip(query_lens, seq_lens))
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + spare_blocks
    outer = (num_blocks, num_layers) if block_major else (num_layers, num_blocks)
    arena = torch.randn(*outer, 2, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_needed, default=0) + extra_columns
    block_tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    for s, n in enumerate(blocks_needed):
        block_tables[s, :n] = torch.tensor(order[:n], dtype=torch.int32)
        del order[:n]
    starts = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    arena = arena.to(device)
    layers = (arena[:, layer, 0], arena[:, layer, 1]) if block_major else \
        (arena[layer, :, 0], arena[layer, :, 1])
    return PagedCase(arena=arena, layer=layer, block_major=block_major, k_cache=layers[0],
                     v_cache=layers[1], block_tables=block_tables.to(device),
                     seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                     query_start_loc=starts.to(device), q=q.to(device), scale=head_dim ** -0.5)


@pytest.fixture
def make_case():
    """The `build_case` factory."""
    return build_case


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """rel_err(actual, expected) within the bound of expected's dtype; same shape and dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error = rel_err(actual, expected)
    assert error <= TOLERANCE[expected.dtype], f"relative error {error:.3g} for {expected.dtype}"


@pytest.fixture
def check_close():
    """`assert_close`: the rel_err bound of the dtype."""
    return assert_close
