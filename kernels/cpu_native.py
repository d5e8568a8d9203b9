"""The native CPU backend: paged-attention decode and the KV write in C++, reading blocks in place.

`csrc/paged_attention_cpu.cpp` walks each sequence's block table and reads its K/V rows where
they lie (no gather copy), with the group's query heads handled together, an online softmax in
float32 and explicit vector code (see the comment opening that file). It is compiled once per
machine, ahead of time, by `build()` (scripts/setup.sh calls it; native_library.py says how and
where; at::parallel_for is OpenMP inlined from the headers). Nothing is compiled at run time:
the first CPU kernel call loads the built library if it is current; otherwise (not built,
stale, or it does not load, e.g. after a torch upgrade) the torch path serves and one log line
says why.

Served here: decode of float32 and bfloat16 caches whose head_dim is a multiple of 16 (also the
single-token sequences of a prefill step), and the KV write (any dtype). Everything else goes
to `torch_paged`: float16 or odd head dims, and each prefill run of two or more queries, whose
SDPA over its gathered blocks is compute-bound, so the copy matters little there. The C++ code
refuses out-of-range block ids and slots itself before it touches the cache (raising
ValueError), so it can never read or write outside it even when the caller skips the Python
value checks; on such an error the Python checks are run to give their usual message.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from kernels import checks, torch_paged
from kernels.native_library import CSRC, NativeLibrary

__all__ = ["EXTENSION_NAME", "build", "extension", "library_path", "serves_decode",
           "paged_attention_decode", "paged_attention_prefill", "reshape_and_cache"]

LIBRARY = NativeLibrary("kvmm_paged_attention_cpu", CSRC / "paged_attention_cpu.cpp",
                        (CSRC / "simd.h",), "native CPU kernels", "kernels.cpu_native",
                        "the torch path serves CPU tensors")
EXTENSION_NAME = LIBRARY.name
SOURCE = LIBRARY.source
DTYPES = (torch.float32, torch.bfloat16)
HEAD_DIM_MULTIPLE = 16          # the widest vector of float32 lanes (AVX-512); C++ checks too

library_path = LIBRARY.library_path
build = LIBRARY.build           # compiles for this machine unless the library is current


@functools.cache
def extension() -> ModuleType | str:
    """The loaded extension, or why there is none (asked once per process; logged once)."""
    return LIBRARY.load()


def serves_decode(q: object) -> bool:
    """Whether decode with this query runs natively (else the torch path): float32 or bfloat16,
    head_dim a multiple of 16. The argument checks decide whether the call is valid at all."""
    return (isinstance(q, torch.Tensor) and q.dtype in DTYPES and q.dim() == 3
            and q.shape[2] % HEAD_DIM_MULTIPLE == 0)


def _native() -> ModuleType:
    module = extension()
    assert isinstance(module, ModuleType), "dispatch picks this backend only once it loaded"
    return module


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Natively when `serves_decode(q)`, else on the torch path."""
    if not serves_decode(q):
        return torch_paged.paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens,
                                                  scale)
    try:
        return _native().paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens,
                                                float(scale))
    except ValueError:
        checks.check_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
        raise


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Sequences with one query token (decodes in a prefill step) run natively, each longer run
    through the torch path on its own."""
    if not serves_decode(q):
        return torch_paged.paged_attention_prefill(q, k_cache, v_cache, block_tables,
                                                   query_start_loc, seq_lens, scale)
    starts = query_start_loc.tolist()
    singles = [s for s in range(len(starts) - 1) if starts[s + 1] - starts[s] == 1]
    if len(singles) == len(starts) - 1:
        return paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if not singles:
        return torch_paged.paged_attention_prefill(q, k_cache, v_cache, block_tables,
                                                   query_start_loc, seq_lens, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rows = torch.tensor(singles, device=q.device)
    tokens = query_start_loc[:-1].index_select(0, rows)
    out[tokens] = paged_attention_decode(q.index_select(0, tokens), k_cache, v_cache,
                                         block_tables.index_select(0, rows),
                                         seq_lens.index_select(0, rows), scale)
    for s in range(len(starts) - 1):
        start, end = starts[s], starts[s + 1]
        if end - start > 1:
            one_run = torch.tensor([0, end - start], dtype=torch.int32, device=q.device)
            out[start:end] = torch_paged.paged_attention_prefill(
                q[start:end], k_cache, v_cache, block_tables[s:s + 1], one_run,
                seq_lens[s:s + 1], scale)
    return out


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """One memcpy per token and cache (any dtype); every slot is checked before any write."""
    try:
        _native().reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    except ValueError:
        checks.check_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
        raise

