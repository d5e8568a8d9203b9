"""Assembling an engine's parts from an EngineConfig: model file, weight pool, model, KV
arena, block pool and KV manager. Errors here are the user's to fix and say how."""
from __future__ import annotations

import logging

import torch

from kvmm_daemon.engine_config import EngineConfig
from kvmm_daemon.engine.model_runner import ModelRunner
from kvmm_daemon.kv.block_pool import BlockPool
from kvmm_daemon.kv.kv_cache import KVCache
from kvmm_daemon.kv.kv_manager import KVCacheManager
from kvmm_daemon.model.llama import LlamaModel
from kvmm_daemon.model.model_file import default_model_path, open_model
from kvmm_daemon.model.weight_pool import ResidentWeightPool

log = logging.getLogger("kvmm.engine")


def build_engine_parts(cfg: EngineConfig, io=None):
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model_path = cfg.model if cfg.model is not None else default_model_path()
    model_file = open_model(model_path)
    spec = model_file.spec
    max_model_len = min(cfg.max_model_len, spec.context_length)
    cfg.max_model_len = max_model_len
    weights = open_weight_pool(cfg, model_file, model_path, io)
    model = LlamaModel(spec, weights, max_positions=max_model_len)
    kv_cache = KVCache.from_budget(cfg.kv_budget, max_model_len=max_model_len, num_layers=spec.num_layers,
                                   block_size=cfg.block_size, num_kv_heads=spec.num_kv_heads,
                                   head_dim=spec.head_dim, dtype=cfg.kv_dtype,
                                   layers_per_piece=cfg.kv_layers_per_piece)
    if not kv_cache.lock() and kv_cache.lock_error:
        log.warning("KV arena not locked in memory: %s", kv_cache.lock_error)
    kv = KVCacheManager(BlockPool(kv_cache.num_blocks), cfg.block_size, spec.model_id)
    return model_file, ModelRunner(model, kv_cache, threads=cfg.threads), kv


def open_io_scheduler(cfg: EngineConfig):
    """The engine's one I/O scheduler (weights and swapfs share it, so its priorities order
    weight reads before swap-ins before prefetches before write-backs); its device profile is
    kept in the state directory (measured once, on first use)."""
    from iosched.device_profile import DeviceProfile
    from iosched.scheduler import IOScheduler
    from kvmm_daemon.model.weight_store import state_dir

    from iosched.errors import IOSchedError

    state = state_dir(cfg.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    try:
        profile = DeviceProfile.load_or_measure(state, state)
    except (OSError, IOSchedError) as e:
        log.warning("no device profile for %s (%s); using the defaults", state, e)
        profile = DeviceProfile.default()
    return IOScheduler(profile=profile, name="kvmm-io")


def open_weight_pool(cfg: EngineConfig, model_file, model_path, io=None):
    """All weights resident (no budget), or a streaming pool under cfg.weight_budget reading
    through `io` (required then)."""
    if cfg.weight_budget is None:
        return ResidentWeightPool(model_file, model_file.spec, linear_mode=cfg.linear_mode)
    from kvmm_daemon.model.weight_store import open_streaming_pool

    assert io is not None, "a weight budget streams through an I/O scheduler"
    return open_streaming_pool(model_file, model_path, model_file.spec, io,
                               budget_bytes=cfg.weight_budget, configured_state=cfg.state_dir,
                               linear_mode=cfg.linear_mode, window=cfg.weight_window)


def open_swap(cfg: EngineConfig, spec, kv_cache: KVCache, io=None):
    """The swapfs store for this model's KV layout under cfg.swap_dir."""
    from swapfs.layout import KVLayout
    from swapfs.swap_space import SwapSpace

    layout = KVLayout(model_id=spec.model_id, num_layers=spec.num_layers, block_size=kv_cache.block_size,
                      num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                      dtype=str(kv_cache.dtype).removeprefix("torch."))
    return SwapSpace(cfg.swap_dir, cfg.swap_size, layout, scheduler=io)
