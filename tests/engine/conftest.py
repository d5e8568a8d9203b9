from __future__ import annotations

import pytest

from kvmm_daemon.engine_config import EngineConfig
from kvmm_daemon.engine.engine import Engine
from tests.model.tiny_llama import write_sensitive_llama


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    # untied, sharp attention: its greedy output depends on every block of KV, so a wrong
    # block (paging, CoW, swap, sessions) changes what the tests compare
    return write_sensitive_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make_engine(tiny_model):
    def make(**overrides) -> Engine:
        cfg = dict(model=str(tiny_model), kv_budget="4MiB", block_size=4, max_model_len=256, threads=1)
        cfg.update(overrides)
        return Engine.from_config(EngineConfig(**cfg))
    return make


def assert_no_leaks(engine: Engine) -> None:
    """Every block is free or cached once nothing runs and no session holds KV."""
    engine.step()
    stats = engine.statistics()
    held = sum(1 for s in engine.sessions.values() if s.seq_id is not None)
    if held == 0:
        assert stats.kv["blocks_allocated"] == 0, stats.kv
    assert stats.requests["running"] == 0 and stats.requests["waiting"] == 0
    assert len(engine.kv) == held
