"""Paged-attention kernels: the public entry points and the choice of backend.

Each entry point checks its arguments (`checks.py`: shapes, dtypes, strides; on CPU also the
block tables, lengths and slots, unless `check_values=False`) and then runs one backend:

- `triton` (`triton_paged.py`) when the tensors are on CUDA and Triton imports, or when the
  environment says `KVMM_KERNEL=triton` (without CUDA the Triton interpreter runs: slow, for
  tests and debugging);
- `native` (`cpu_native.py`, C++ built for the machine by scripts/setup.sh) for CPU tensors
  when it is built, or when `KVMM_KERNEL=native`; it hands what it does not serve (prefill,
  float16) to the torch path;
- `torch` (`torch_paged.py`) otherwise, or when `KVMM_KERNEL=torch`.

`check_values=False` skips the value checks (the layout checks always run): for a caller that
passes the same metadata to every layer and has it checked once per step. The native kernels
check block ids and slots themselves as they read them, so on that path the Python value checks
are skipped regardless and nothing ever reads outside the cache.

`reference.py` is the plain yardstick for tests and is never dispatched to. The variable is
read on every call so that tests and tools can switch backends in one process. Shapes follow
vLLM / flash-attn varlen conventions; see docs/internals.md for the cache layout.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from kernels import checks, cpu_native, torch_paged

__all__ = ["paged_attention_decode", "paged_attention_prefill", "reshape_and_cache", "backend_for"]

KERNEL_ENV = "KVMM_KERNEL"
BACKENDS = ("auto", "torch", "native", "triton")


@functools.cache
def _load_triton() -> ModuleType | ImportError:
    """kernels.triton_paged, or why it cannot be imported here (asked once per process)."""
    try:
        return importlib.import_module("kernels.triton_paged")
    except ImportError as err:
        return err


def backend_for(device: torch.device) -> str:
    """The backend ("torch", "native" or "triton") that serves tensors on this device now."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{KERNEL_ENV}={choice!r} is not one of {', '.join(BACKENDS)}; "
                         f"unset it or pick one")
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "triton" if isinstance(_load_triton(), ModuleType) else "torch"
    if device.type == "cpu" and isinstance(cpu_native.extension(), ModuleType):
        return "native"
    return "torch"


def _backend(device: torch.device) -> ModuleType:
    choice = backend_for(device)
    if choice == "torch":
        return torch_paged
    if choice == "native":
        native = cpu_native.extension()
        if device.type != "cpu" or not isinstance(native, ModuleType):
            why = native if device.type == "cpu" else f"they serve CPU tensors, not {device.type}"
            raise ValueError(f"{KERNEL_ENV}=native but the native kernels cannot run ({why}); "
                             f"fix that or set {KERNEL_ENV}=torch")
        return cpu_native
    module = _load_triton()
    if isinstance(module, ImportError):
        raise ValueError(f"{KERNEL_ENV}=triton but the triton kernels do not import ({module}); "
                         f"fix that or set {KERNEL_ENV}=torch")
    return module


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, *, check_values: bool = True) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context.

    q [num_seqs, num_heads, head_dim]; k_cache, v_cache [num_blocks, block_size,
    num_kv_heads, head_dim] (one layer, inner dims contiguous); block_tables int32
    [num_seqs, max_blocks_per_seq], -1 past each sequence's blocks; seq_lens int32
    [num_seqs], context length including the new token. Returns [num_seqs, num_heads, head_dim]
    in q's dtype.
    """
    backend = _backend(checks.device_of("q", q))
    self_checked = backend is cpu_native and cpu_native.serves_decode(q)
    checks.check_decode(q, k_cache, v_cache, block_tables, seq_lens, scale,
                        values=check_values and not self_checked)
    return backend.paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, *,
                            check_values: bool = True) -> torch.Tensor:
    """Causal attention of a ragged batch of query runs over their paged contexts.

    q [total_query_tokens, num_heads, head_dim]; sequence s owns rows
    query_start_loc[s]:query_start_loc[s + 1] (int32 [num_seqs + 1]); its query i sits at
    position seq_lens[s] - query_len[s] + i and sees positions up to and including its own.
    Returns [total_query_tokens, num_heads, head_dim] in q's dtype.
    """
    checks.check_prefill(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                         values=check_values)
    return _backend(q.device).paged_attention_prefill(q, k_cache, v_cache, block_tables,
                                                      query_start_loc, seq_lens, scale)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                      check_values: bool = True) -> None:
    """Writes k, v [num_tokens, num_kv_heads, head_dim] into their cache slots in place.

    slot_mapping int64 or int32 [num_tokens]: slot = block_id * block_size + offset;
    -1 skips the token.
    """
    backend = _backend(checks.device_of("k", k))
    checks.check_reshape_and_cache(k, v, k_cache, v_cache, slot_mapping,
                                   values=check_values and backend is not cpu_native)
    backend.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
