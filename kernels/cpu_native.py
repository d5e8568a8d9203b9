"""The native CPU backend: paged-attention decode and the KV write in C++, reading blocks in place.

`csrc/paged_attention_cpu.cpp` walks each sequence's block table and reads its K/V rows where
they lie (no gather copy), with the group's query heads handled together, an online softmax in
float32 and explicit vector code (see the comment opening that file). It is compiled once per
machine, ahead of time, by `build()` (scripts/setup.sh calls it) with torch.utils.cpp_extension
(ninja, a C++ compiler, Python headers) and `-O3 -march=native -fopenmp` (at::parallel_for is
OpenMP inlined from the headers) into `<venv>/torch_extensions/` (or TORCH_EXTENSIONS_DIR): the
library belongs to the machine that built it. Nothing is compiled at run time: the first CPU
kernel call loads the built library if it exists and is newer than its sources; otherwise (not
built, stale, or it does not load, e.g. after a torch upgrade) the torch path serves and one
log line says why.

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
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from kernels import checks, torch_paged

__all__ = ["EXTENSION_NAME", "build", "extension", "library_path", "serves_decode",
           "paged_attention_decode", "paged_attention_prefill", "reshape_and_cache"]

log = logging.getLogger("kvmm.kernels")

EXTENSION_NAME = "kvmm_paged_attention_cpu"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "paged_attention_cpu.cpp"
HEADERS = (CSRC / "simd.h",)
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
DTYPES = (torch.float32, torch.bfloat16)
HEAD_DIM_MULTIPLE = 16          # the widest vector of float32 lanes (AVX-512); C++ checks too
STALE_LOCK_S = 600              # a build lock older than this was left by a killed build


def build_directory() -> Path:
    """Where the library is built: $TORCH_EXTENSIONS_DIR or <venv>/torch_extensions, per name."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")
    return Path(root) / EXTENSION_NAME


def library_path() -> Path:
    return build_directory() / f"{EXTENSION_NAME}.so"


def _up_to_date(library: Path) -> bool:
    """The library exists and is newer than the source and every header it includes."""
    newest = max(path.stat().st_mtime for path in (SOURCE, *HEADERS))
    return library.exists() and library.stat().st_mtime >= newest


def build(*, force: bool = False, verbose: bool = False) -> Path:
    """Compiles the extension for this machine unless the library is newer than its source.

    Returns the library's path; raises what the compiler or ninja raise (ninja is required)."""
    library = library_path()
    if not force and _up_to_date(library):
        return library
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        lock.unlink()                       # cpp_extension would wait on it forever
    cpp_extension.load(EXTENSION_NAME, [str(SOURCE)], extra_cflags=CFLAGS,
                       build_directory=str(directory), verbose=verbose)
    assert _up_to_date(library), f"the build left no library at {library}"
    return library


@functools.cache
def extension() -> ModuleType | str:
    """The loaded extension, or why there is none (asked once per process; logged once)."""
    library = library_path()
    if not library.exists():
        reason = f"native CPU kernels not built ({library} missing); run scripts/setup.sh"
    elif not _up_to_date(library):
        reason = (f"native CPU kernels out of date ({library.name} is older than {SOURCE.name}); "
                  f"run scripts/setup.sh")
    else:
        try:
            spec = importlib.util.spec_from_file_location(EXTENSION_NAME, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except (ImportError, OSError) as err:
            reason = (f"native CPU kernels do not load ({err}); rebuild them with "
                      f"kernels.cpu_native.build(force=True)")
    log.warning("%s; the torch path serves CPU tensors", reason)
    return reason


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

