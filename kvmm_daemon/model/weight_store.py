"""Where prepared weight files live, and opening a streaming pool on one.

`state_dir()` resolves the daemon's state directory (config > $KVMM_STATE_DIR >
/var/lib/kvmm when writable > ~/.cache/kvmm). `prepare()` writes the weight file for a model
(the conversion runs here; the engine calls it in a child process, `kvmm weights prepare`, so
the serving process never holds the conversion's memory). `open_streaming_pool()` opens the
file for the key of this model, torch and CPU, preparing it when it is missing, stale or
corrupt (checksums are checked on open), and builds the StreamingWeightPool.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from kvmm_daemon.errors import ConfigError, WeightFileError
from kvmm_daemon.model.weight_file import (WeightFile, print_progress, weight_file_path, weight_key,
                                          write_weight_file)
from kvmm_daemon.model.weight_segments import ModelWeights

log = logging.getLogger("kvmm.weights")


def state_dir(configured: str | None = None) -> Path:
    if configured:
        return Path(configured)
    if os.environ.get("KVMM_STATE_DIR"):
        return Path(os.environ["KVMM_STATE_DIR"])
    system = Path("/var/lib/kvmm")
    if system.is_dir() and os.access(system, os.W_OK):
        return system
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvmm"


def prepare(model_file, model_path, state: Path, *, linear_mode: str = "auto",
            progress: bool = True) -> WeightFile:
    """Write (or rewrite) the weight file of `model_path` under `state`; old files of the
    same model with another key are removed."""
    state.mkdir(parents=True, exist_ok=True)
    key = weight_key(model_path, linear_mode, state)
    path = weight_file_path(state, model_path, key)
    wf = write_weight_file(ModelWeights(model_file, model_file.spec, linear_mode=linear_mode), path, key,
                           progress=print_progress if progress else None)
    for old in state.glob(f"{Path(model_path).stem}-*.kvw"):
        if old != path:
            old.unlink(missing_ok=True)
    return wf


def _prepare_in_child(model_path, state: Path, linear_mode: str) -> None:
    cmd = [sys.executable, "-m", "kvmm_daemon.cli", "weights", "prepare", "--model", str(model_path),
           "--state-dir", str(state), "--linear-mode", linear_mode]
    log.info("preparing the weight file for %s in %s", model_path, state)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        raise ConfigError(lines[-1].removeprefix("kvmm: error: ") if lines else
                          f"preparing the weight file failed (exit {done.returncode})")


def open_streaming_pool(model_file, model_path, spec, io, *, budget_bytes: int, configured_state: str | None,
                        linear_mode: str = "auto", window: int = 0):
    from kvmm_daemon.model.streaming_weight_pool import StreamingWeightPool

    state = state_dir(configured_state)
    state.mkdir(parents=True, exist_ok=True)
    key = weight_key(model_path, linear_mode, state)
    path = weight_file_path(state, model_path, key)
    for attempt in (1, 2):
        if not path.exists():
            _prepare_in_child(model_path, state, linear_mode)
        try:
            wf = WeightFile.open(path, key)
            return StreamingWeightPool(wf, spec, io, budget_bytes=budget_bytes,
                                       linear_mode=linear_mode, window=window)
        except WeightFileError as e:
            if attempt == 2:
                raise
            log.warning("%s; rebuilding it", e)
            path.unlink(missing_ok=True)
    raise AssertionError("unreachable")
