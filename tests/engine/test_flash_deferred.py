"""Deferred flash writes (FlashTier): a session turn's write-through and evicted prefix
blocks are submitted at KV_WRITE_BACK and committed on a later step (or at close), from a
copy, so the KV pool may reuse the blocks meanwhile; a failed deferred write degrades as a
synchronous one did (counted, logged, the previous version kept, the next save catches up)."""
from __future__ import annotations

import logging
import time

from kvmm_daemon.engine.sampling_params import SamplingParams
from swapfs.errors import SwapIOError
from tests.engine.test_engine import PROMPT, greedy
from tests.engine.test_flash_faults import engine_of, sensitive_model, swap_dir  # noqa: F401

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def finish_turn(engine, rid: str, prompt: list[int]) -> list[int]:
    """Step until the request finishes (not one step more); its tokens."""
    engine.add_request(rid, prompt, PARAMS, session_id="chat")
    got: list[int] = []
    while True:
        for out in engine.step():
            got += [t for d in out.deltas for t in d.token_ids]
            if out.finished:
                return got


def stored_tokens(engine):
    try:
        return engine.tier.swap.session_info("chat").token_ids
    except KeyError:
        return None


def test_write_through_commits_on_a_later_step_from_a_copy(engine_of, swap_dir):
    reference = engine_of()
    engine = engine_of(swap_dir=swap_dir, swap_size="8MiB")
    out = finish_turn(engine, "t1", PROMPT)
    history = PROMPT + out
    # the step that finished the turn submitted its write-through and returned
    assert engine.tier.has_pending() and engine.has_unfinished_requests()
    assert stored_tokens(engine) is None and not engine.sessions["chat"].on_flash
    # the write is from a copy: the arena may change at once without reaching flash
    engine.runner.kv_cache.kv.zero_()
    engine.step()                                   # nothing to compute: completes it
    assert not engine.tier.has_pending() and not engine.has_unfinished_requests()
    assert stored_tokens(engine) == tuple(history) and engine.sessions["chat"].on_flash
    engine.close()
    again = engine_of(swap_dir=swap_dir, swap_size="8MiB")
    res = again.generate([7, 8], PARAMS, session_id="chat")
    assert res.usage.cached_prompt_tokens == len(history) - 1          # all from flash
    assert res.choices[0].token_ids == greedy(reference, history + [7, 8], n=6)
    again.close()


def test_close_commits_deferred_writes(engine_of, swap_dir):
    engine = engine_of(swap_dir=swap_dir, swap_size="8MiB")
    history = PROMPT + finish_turn(engine, "t1", PROMPT)
    assert engine.tier.has_pending() and stored_tokens(engine) is None
    engine.close()
    again = engine_of(swap_dir=swap_dir, swap_size="8MiB")
    assert again.tier.swap.session_info("chat").token_ids == tuple(history)
    again.close()


def test_failed_deferred_write_degrades_and_the_next_save_catches_up(engine_of, swap_dir, caplog,
                                                                     monkeypatch):
    reference = engine_of()
    engine = engine_of(swap_dir=swap_dir, swap_size="8MiB")
    history = PROMPT + finish_turn(engine, "t1", PROMPT)
    engine.step()
    assert stored_tokens(engine) == tuple(history)
    free_before = engine.tier.swap.statistics().free_slots
    store = engine.tier.swap._store
    real = store.finish_write

    def failing(pending):
        real(pending)                               # the I/O ends, then "fails"
        raise SwapIOError("writing swap file: Input/output error (errno 5) [injected]")
    monkeypatch.setattr(store, "finish_write", failing)
    caplog.set_level(logging.WARNING)
    turn = [10, 11]
    history2 = history + turn + finish_turn(engine, "t2", turn)
    engine.step()
    assert not engine.tier.has_pending() and not engine.sessions["chat"].on_flash
    assert stored_tokens(engine) == tuple(history)                      # previous version kept
    assert engine.statistics().flash["errors"].get("eio", 0) >= 1
    assert any("session save failed" in r.getMessage() for r in caplog.records)
    assert engine.tier.swap.statistics().free_slots == free_before      # staged slots freed
    monkeypatch.setattr(store, "finish_write", real)
    turn = [12]
    out = finish_turn(engine, "t3", turn)
    assert out == greedy(reference, history2 + turn, n=6)
    engine.step()
    assert stored_tokens(engine) == tuple(history2 + turn + out) and engine.sessions["chat"].on_flash
    engine.close()


def test_evicted_prefix_blocks_are_committed_a_step_later(engine_of, swap_dir):
    engine = engine_of(kv_budget=20 * 2048, max_model_len=64, swap_dir=swap_dir, swap_size="8MiB")
    long_prompt = PROMPT * 2
    greedy(engine, long_prompt, n=4)
    checked = 0
    for k in range(4):                              # push the prompt's blocks out of memory
        engine.add_request(f"r{k}", [(t + 37 * (k + 1)) % 320 for t in long_prompt], PARAMS)
        seen: set[int] = set()
        while engine.has_unfinished_requests():
            engine.step()
            new = [d for d in engine.tier._pending if d.what == "prefix write"
                   and id(d) not in seen and d.commit.prefix]
            seen.update(id(d) for d in engine.tier._pending)
            for d in new:                           # submitted by this step, not committed
                assert engine.tier.swap.has_prefix_blocks(d.commit.prefix) == 0
            if new and engine.has_unfinished_requests():
                while not all(d.commit.done() for d in new):
                    time.sleep(0.001)               # the device finishes the writes...
                engine.step()                       # ...and the next step commits them
                for d in new:
                    assert engine.tier.swap.has_prefix_blocks(d.commit.prefix) == len(d.commit.prefix)
                    checked += 1
    assert checked and engine.statistics().flash["prefix_blocks_written"] > 0
    engine.close()
