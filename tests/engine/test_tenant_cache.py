"""Per-tenant prefix caching in the engine (issue 8, item 1): in memory and in the flash
prefix tier, blocks are found only by requests of the uid that computed them, unless the
cache is configured as shared; prefix blocks stored under the old unsalted scheme are
discarded at open with one log line."""
from __future__ import annotations

import logging

import numpy as np

from kvmm_daemon.engine.sampling_params import SamplingParams
from kvmm_daemon.kv.block_hash import hash_full_blocks
from tests.engine.test_engine import PROMPT
from tests.engine.test_flash_tier import swap_dir  # noqa: F401  (fixture)

PARAMS = SamplingParams(max_tokens=2, ignore_eos=True)


def generate(engine, prompt, owner, rid):
    engine.add_request(rid, prompt, PARAMS, owner=owner)
    final = None
    while final is None:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    assert final.error is None, final.error
    return final


def test_memory_prefix_cache_is_per_uid(make_engine):
    engine = make_engine()
    generate(engine, PROMPT, 1000, "a")
    assert generate(engine, PROMPT, 1001, "b").usage.cached_prompt_tokens == 0   # no side channel
    assert generate(engine, PROMPT, 1000, "c").usage.cached_prompt_tokens > 0
    engine.close()


def test_shared_prefix_cache_is_an_option(make_engine):
    engine = make_engine(share_prefix_cache=True)
    generate(engine, PROMPT, 1000, "a")
    assert generate(engine, PROMPT, 1001, "b").usage.cached_prompt_tokens > 0
    engine.close()


def test_flash_prefix_tier_is_per_uid(make_engine, swap_dir):  # noqa: F811
    engine = make_engine(kv_budget=20 * 2048, max_model_len=64, swap_dir=swap_dir, swap_size="8MiB")
    long_prompt = PROMPT * 2
    generate(engine, long_prompt, 1000, "a")
    for k in range(4):                       # push the prompt's blocks out of memory to flash
        generate(engine, [(t + 37 * (k + 1)) % 320 for t in long_prompt], 1000, f"x{k}")
    st = engine.statistics().flash
    before = st["prefix_tokens_from_flash"]
    assert st["prefix_blocks_written"] > 0
    other = generate(engine, long_prompt, 1001, "b")
    assert other.usage.cached_prompt_tokens == 0
    assert engine.statistics().flash["prefix_tokens_from_flash"] == before
    engine.close()


def test_old_scheme_prefix_blocks_are_discarded_with_one_line(make_engine, swap_dir, caplog):  # noqa: F811
    engine = make_engine(swap_dir=swap_dir, swap_size="8MiB")
    space = engine.tier.swap
    old = hash_full_blocks(PROMPT, 4, engine.kv.model_id)           # unsalted, as before
    block = np.zeros(engine.runner.kv_cache.block_bytes, dtype=np.uint8)
    space.put_prefix_blocks([(h, block) for h in old])
    space._meta.retag_prefixes("prefix_hash_scheme", "none", [])  # as a store from before
    engine.close()
    caplog.set_level(logging.WARNING, logger="kvmm.engine")
    engine = make_engine(swap_dir=swap_dir, swap_size="8MiB")
    lines = [r for r in caplog.records if "older hash scheme" in r.getMessage()]
    assert len(lines) == 1 and f"discarded {len(old)} prefix blocks" in lines[0].getMessage()
    assert engine.tier.swap.has_prefix_blocks(old) == 0
    engine.close()
    caplog.clear()
    make_engine(swap_dir=swap_dir, swap_size="8MiB").close()       # recorded: nothing to drop
    assert not [r for r in caplog.records if "older hash scheme" in r.getMessage()]
