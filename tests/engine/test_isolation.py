"""One request's bad data fails that request only (issue 8, item 3).

Several tenants share one batch; a failure is injected at each stage (scheduling, block
hashing, the model step, sampling) for one of them, plus real bad data (negative and
out-of-vocabulary token ids, a session history holding one). The bad request ends with an
error naming the stage, every other request finishes with the tokens it gets when run
alone, and no block leaks.
"""
from __future__ import annotations

import pytest

from kvmm_daemon.engine import choices
from kvmm_daemon.engine.sampling_params import SamplingParams
from tests.engine.conftest import assert_no_leaks

POISON = 299                      # a token id only the bad request's prompt holds
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
GOOD = {1000: [5, 17, 33, 41, 42, 60, 61, 70, 71], 1001: [9, 8, 7, 6, 5, 4, 3, 2, 11, 12]}


def _run_batch(engine, bad_prompt: list[int]) -> dict:
    """Submit GOOD's requests and one bad one (uid 1002) together; run to completion."""
    for uid, prompt in GOOD.items():
        engine.add_request(f"u{uid}", prompt, PARAMS, owner=uid)
    engine.add_request("bad", bad_prompt, PARAMS, owner=1002)
    finals = {}
    for _ in range(200):
        for out in engine.step():
            tokens = finals.setdefault(out.request_id, {"tokens": [], "error": None, "done": False})
            for d in out.deltas:
                tokens["tokens"] += list(d.token_ids)
            tokens["error"] = out.error or tokens["error"]
            tokens["done"] |= out.finished
        if len(finals) == 3 and all(f["done"] for f in finals.values()):
            break
    return finals


@pytest.fixture(scope="module")
def expected(tiny_model):
    from kvmm_daemon.engine_config import EngineConfig
    from kvmm_daemon.engine.engine import Engine
    engine = Engine.from_config(EngineConfig(model=str(tiny_model), kv_budget="4MiB", block_size=4,
                                             max_model_len=256, threads=1))
    try:
        return {f"u{uid}": list(engine.generate(p, PARAMS).choices[0].token_ids)
                for uid, p in GOOD.items()}
    finally:
        engine.close()


def _check(engine, finals, expected, stage: str) -> None:
    assert finals["bad"]["done"] and finals["bad"]["error"], finals["bad"]
    assert stage in finals["bad"]["error"]
    for rid, want in expected.items():
        assert finals[rid]["error"] is None, finals[rid]
        assert finals[rid]["tokens"] == want, rid
    assert_no_leaks(engine)


def _poisoned(token_ids) -> bool:
    return POISON in list(token_ids)


def test_failure_while_scheduling_fails_only_that_request(make_engine, expected, monkeypatch):
    engine = make_engine()
    real = engine.kv.allocate

    def allocate(seq_id, token_ids, *args):
        if _poisoned(token_ids):
            raise RuntimeError("injected allocation failure")
        return real(seq_id, token_ids, *args)
    monkeypatch.setattr(engine.kv, "allocate", allocate)
    _check(engine, _run_batch(engine, [POISON, 3, 4, 5, 6, 7]), expected, "scheduling")


def test_failure_while_hashing_fails_only_that_request(make_engine, expected, monkeypatch):
    engine = make_engine()
    real = engine.kv.commit

    def commit(seq_id, n):
        if _poisoned(engine.kv._seq(seq_id).token_ids):
            raise ValueError("injected hash failure")
        return real(seq_id, n)
    monkeypatch.setattr(engine.kv, "commit", commit)
    _check(engine, _run_batch(engine, [POISON, 3, 4, 5, 6, 7]), expected, "block hashing")


def test_failure_in_the_model_step_fails_only_that_request(make_engine, expected, monkeypatch):
    engine = make_engine()
    real = engine.runner.execute

    def execute(chunks, copies=(), **kw):
        if any(_poisoned(c.token_ids) for c in chunks):
            raise RuntimeError("injected kernel failure")
        return real(chunks, copies, **kw)
    monkeypatch.setattr(engine.runner, "execute", execute)
    _check(engine, _run_batch(engine, [POISON, 3, 4, 5, 6, 7]), expected, "model step")


def test_failure_while_sampling_fails_only_that_request(make_engine, expected, monkeypatch):
    engine = make_engine()
    real = choices.expand

    def expand(req, logits, kv, seed):
        if _poisoned(req.prompt_token_ids):
            raise FloatingPointError("injected sampler failure")
        return real(req, logits, kv, seed)
    monkeypatch.setattr(choices, "expand", expand)
    _check(engine, _run_batch(engine, [POISON, 3, 4, 5, 6, 7]), expected, "sampling")


@pytest.mark.parametrize("bad", [[3, -1, 4, 5, 6, 7], [3, 4, 5, 6, 7, 100_000]],
                         ids=["negative", "beyond-vocab"])
def test_real_bad_token_ids_fail_only_their_request(make_engine, expected, bad):
    engine = make_engine()        # add_request takes ids unchecked (a session history can too)
    finals = _run_batch(engine, bad)
    assert finals["bad"]["error"]
    for rid, want in expected.items():
        assert finals[rid]["tokens"] == want and finals[rid]["error"] is None
    assert_no_leaks(engine)


def test_a_session_history_with_a_bad_token_fails_its_turn_only(make_engine, expected):
    engine = make_engine()
    engine.open_session("1002:forged", owner=1002)
    engine.step()
    engine.sessions["1002:forged"].token_ids = [3, 4, -7, 5, 6, 7, 8, 9]   # as a forged import
    for uid, prompt in GOOD.items():
        engine.add_request(f"u{uid}", prompt, PARAMS, owner=uid)
    engine.add_request("bad", [10, 11], PARAMS, session_id="1002:forged", owner=1002)
    done, errors, tokens = set(), {}, {}
    for _ in range(200):
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t for d in out.deltas for t in d.token_ids)
            if out.finished:
                done.add(out.request_id)
                errors[out.request_id] = out.error
        if len(done) == 3:
            break
    assert errors["bad"] and all(errors[r] is None for r in expected)
    assert {r: tokens[r] for r in expected} == expected
    assert not engine.sessions["1002:forged"].busy
    assert_no_leaks(engine)
