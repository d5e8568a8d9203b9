"""EngineConfig: the single source of sizes and paths for one engine.

Budgets are bytes. The KV budget becomes a number of blocks once the model's shape is known
(KVCache.num_blocks_for_budget); the weight budget bounds the weight pool's resident bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from kvmm_daemon.errors import ConfigError
from kvmm_daemon.sizes import parse_size

KV_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None               # GGUF file or safetensors dir; None = embedded SmolLM2
    kv_budget: int = 256 << 20             # bytes for the KV arena
    weight_budget: int | None = None       # bytes the weight pool may hold; None = all resident
    weight_window: int = 0                 # slots streamed weights cycle through; 0 = from measurements
    state_dir: str | None = None           # weight files etc.; None = $KVMM_STATE_DIR, /var/lib/kvmm, ~/.cache/kvmm
    block_size: int = 16                   # tokens per KV block
    max_model_len: int = 2048              # longest prompt + completion of one sequence
    max_num_seqs: int = 64                 # sequences running at once
    max_num_batched_tokens: int = 512      # per-step token budget (chunked prefill)
    kv_dtype: str = "float32"
    kv_layers_per_piece: int | None = None   # KV arena layout (kv_cache.py); None = its default
    threads: int | None = None             # torch intra-op threads; None = all cores
    linear_mode: str = "auto"              # how quantized weights are multiplied
    swap_dir: str | None = None            # swapfs directory (flash tier); None = no flash tier
    swap_size: int = 1 << 30               # bytes of the preallocated slot file
    mount: str | None = None               # where the daemon mounts the swapfs FUSE view
    session_idle_s: float = 60.0           # a parked session's memory is released after this
    preemption: str = "auto"               # auto (cost model) | swap | recompute
    share_prefix_cache: bool = False       # one prefix cache for all uids (single-tenant boards)
    swap_quota_per_uid: int | None = None  # bytes of stored sessions one uid may hold; None = a fair share

    def __post_init__(self) -> None:
        self.kv_budget = parse_size(self.kv_budget, what="--kv-budget")
        if self.weight_budget is not None:
            self.weight_budget = parse_size(self.weight_budget, what="--weight-budget")
        for name in ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer (got {value!r})")
        if self.block_size > 256:
            raise ConfigError(f"block_size {self.block_size} is too large; use 1..256 (16 is usual)")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        if not isinstance(self.weight_window, int) or self.weight_window < 0:
            raise ConfigError(f"weight_window must be 0 (measured) or a number of slots >= 1 "
                              f"(got {self.weight_window!r})")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"threads must be positive (got {self.threads})")
        self.swap_size = parse_size(self.swap_size, what="--swap-size")
        if self.swap_quota_per_uid is not None:
            self.swap_quota_per_uid = parse_size(self.swap_quota_per_uid, what="swap_quota_per_uid")
        if self.session_idle_s < 0:
            raise ConfigError(f"session_idle_s must not be negative (got {self.session_idle_s})")
        if self.preemption not in ("auto", "swap", "recompute"):
            raise ConfigError(f"preemption {self.preemption!r} is not one of auto, swap, recompute")
        if isinstance(self.share_prefix_cache, str):      # from $KVMM_SHARE_PREFIX_CACHE
            self.share_prefix_cache = {"1": True, "true": True, "yes": True, "0": False, "false": False,
                                       "no": False}.get(self.share_prefix_cache.lower(), self.share_prefix_cache)
        if not isinstance(self.share_prefix_cache, bool):
            raise ConfigError(f"share_prefix_cache must be true or false (got {self.share_prefix_cache!r}); "
                              "leave it false unless one user owns the whole board")
        if self.swap_dir is not None:
            self.swap_dir = os.fspath(self.swap_dir)
        if self.mount is not None:
            if self.swap_dir is None:
                raise ConfigError("--mount shows the flash tier, so it needs --swap-dir too")
            self.mount = os.fspath(self.mount)
        if self.model is not None:
            self.model = os.fspath(self.model)
