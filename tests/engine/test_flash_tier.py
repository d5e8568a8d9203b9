"""The engine with its flash tier (swapfs) on a tiny model: swap preemption, the prefix
cache's second tier, sessions that survive restarts, corrupt slots recomputed."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from kvmm_daemon.engine.sampling_params import SamplingParams
from tests.engine.conftest import assert_no_leaks
from tests.engine.test_engine import PROMPT, greedy


@pytest.fixture
def swap_dir():
    d = tempfile.mkdtemp(prefix="kvmm-tier-", dir="/var/tmp")   # O_DIRECT needs a real fs
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_all(engine, reqs):
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for d in out.deltas:
                got.setdefault(out.request_id, []).extend(d.token_ids)
    return got


def test_swap_preemption_restores_exact_kv(make_engine, swap_dir):
    want = greedy(make_engine(), PROMPT, n=30)
    tight = make_engine(kv_budget=16 * 2048, max_model_len=56, swap_dir=swap_dir, swap_size="8MiB",
                        preemption="swap")
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    for i in range(3):
        tight.add_request(f"p{i}", PROMPT, params)
    got = run_all(tight, None)
    assert all(v == want for v in got.values()), got
    flash = tight.statistics().flash
    assert flash["swap_preemptions"] > 0 and flash["swapped_in_tokens"] > 0
    assert flash["swap_slots"] == 0          # every swapped block came back and was freed
    assert_no_leaks(tight)
    tight.close()


def test_evicted_prefix_blocks_come_back_from_flash(make_engine, swap_dir):
    engine = make_engine(kv_budget=20 * 2048, max_model_len=64, swap_dir=swap_dir, swap_size="8MiB")
    long_prompt = PROMPT * 2
    first = greedy(engine, long_prompt, n=4)
    for k in range(4):                                    # push the prompt's blocks out of memory
        greedy(engine, [(t + 37 * (k + 1)) % 320 for t in long_prompt], n=4)
    before = engine.statistics().flash["prefix_tokens_from_flash"]
    again = engine.generate(long_prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    assert again.choices[0].token_ids == first
    assert engine.statistics().flash["prefix_tokens_from_flash"] > before
    assert again.usage.cached_prompt_tokens == 0 or again.usage.cached_prompt_tokens < len(long_prompt)
    engine.close()


def test_session_survives_restart_and_resumes_from_flash(make_engine, swap_dir):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    e1 = make_engine(swap_dir=swap_dir, swap_size="8MiB")
    first = e1.generate(PROMPT, params, session_id="chat")
    e1.close()
    e2 = make_engine(swap_dir=swap_dir, swap_size="8MiB")
    assert [s.session_id for s in e2.list_sessions()] == ["chat"]
    turn = [7, 8, 9]
    second = e2.generate(turn, params, session_id="chat")
    history = PROMPT + first.choices[0].token_ids
    assert second.usage.cached_prompt_tokens == len(history) - 1
    assert second.choices[0].token_ids == greedy(make_engine(), history + turn, n=6)
    e2.delete_session("chat")
    assert_no_leaks(e2)
    assert e2.tier.swap.list_sessions() == []
    e2.close()


def test_corrupt_session_slot_is_recomputed_not_served(make_engine, swap_dir):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    e1 = make_engine(swap_dir=swap_dir, swap_size="8MiB")
    first = e1.generate(PROMPT, params, session_id="s")
    e1.close()
    slot_file = next(os.path.join(swap_dir, f) for f in os.listdir(swap_dir) if f.endswith(".slots"))
    with open(slot_file, "r+b") as f:                     # flip bytes in every slot's payload
        size = os.path.getsize(slot_file)
        for off in range(8192 + 4096 + 100, size, 4096):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]) if b else b"\x01")
    e2 = make_engine(swap_dir=swap_dir, swap_size="8MiB")
    second = e2.generate([7, 8, 9], params, session_id="s")
    history = PROMPT + first.choices[0].token_ids
    assert second.choices[0].token_ids == greedy(make_engine(), history + [7, 8, 9], n=6)
    assert second.usage.cached_prompt_tokens < len(history) - 1
    assert e2.statistics().flash["errors"] or e2.statistics().flash["swapfs_errors"]
    e2.close()
