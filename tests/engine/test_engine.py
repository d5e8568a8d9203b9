"""Engine behaviour on a tiny random-weight Llama (safetensors), checked against a dense
reference forward written here from the Hugging Face formulas (rotate-half RoPE on the
unpermuted weights), so the GGUF permutation, paging, chunking and batching are all covered."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kvmm_daemon.engine.sampling_params import SamplingParams
from kvmm_daemon.engine.scoring import score
from kvmm_daemon.errors import CapacityError, RequestError
from tests.engine.conftest import assert_no_leaks

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11, 12, 13, 77, 31, 45, 200, 201, 19, 88, 6, 1, 9]


def dense_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    """HF Llama forward, no cache: logits [T, vocab]."""
    cfg = json.loads((model_dir / "config.json").read_text())
    w = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh
    t = len(token_ids)
    x = w["model.embed_tokens.weight"][token_ids]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(t).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda v: torch.cat([-v[..., d // 2:], v[..., : d // 2]], -1)
    norm = lambda v, g: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * g
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = norm(x, w[p + "input_layernorm.weight"])
        q = (a @ w[p + "self_attn.q_proj.weight"].T).view(t, nh, d).transpose(0, 1)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).view(t, nkv, d).transpose(0, 1)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(t, nkv, d).transpose(0, 1)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / d ** 0.5 + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(t, h) @ w[p + "self_attn.o_proj.weight"].T
        m = norm(x, w[p + "post_attention_layernorm.weight"])
        g = torch.nn.functional.silu(m @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (g * (m @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = norm(x, w["model.norm.weight"])
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def greedy(engine, prompt, n=12, **kw):
    return engine.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True, **kw)).choices[0].token_ids


def test_paged_forward_matches_dense_reference(make_engine, tiny_model):
    engine = make_engine()
    res = score(engine, PROMPT)
    ref = torch.log_softmax(dense_logits(tiny_model, PROMPT)[:-1], -1)
    want = ref.gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(res.logprob_of_next), want, atol=1e-4)
    assert res.top1_next == ref.argmax(-1).tolist()


def test_greedy_decode_matches_dense_reference(make_engine, tiny_model):
    engine = make_engine()
    got = greedy(engine, PROMPT, n=8)
    seq = list(PROMPT)
    for _ in range(8):
        seq.append(int(dense_logits(tiny_model, seq)[-1].argmax()))
    assert got == seq[len(PROMPT):]
    assert_no_leaks(engine)


def test_chunked_prefill_and_batching_do_not_change_results(make_engine):
    alone = make_engine()
    prompts = [PROMPT[i:] + PROMPT[:i] for i in range(5)]
    want = [greedy(alone, p) for p in prompts]
    batched = make_engine(max_num_batched_tokens=7)     # prefill in chunks of <= 7 tokens
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        batched.add_request(f"r{i}", p, params)
    got: dict[str, list[int]] = {}
    while batched.has_unfinished_requests():
        for out in batched.step():
            got.setdefault(out.request_id, []).extend(out.deltas[0].token_ids if out.deltas else [])
    assert [got[f"r{i}"] for i in range(5)] == want
    assert_no_leaks(batched)


def test_preemption_by_recompute_completes_every_request(make_engine):
    want = greedy(make_engine(), PROMPT, n=40)
    # 16 blocks of 4 tokens (2 KiB each): three 52-token sequences cannot all stay resident
    tight = make_engine(kv_budget=16 * 2048, max_model_len=56)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    for i in range(3):
        tight.add_request(f"p{i}", PROMPT, params)
    got: dict[str, list[int]] = {}
    while tight.has_unfinished_requests():
        for out in tight.step():
            got.setdefault(out.request_id, []).extend(out.deltas[0].token_ids)
    assert all(v == want[:30] for v in got.values()), got
    assert tight.statistics().requests["preemptions"] > 0
    assert_no_leaks(tight)


def test_requests_that_can_never_fit_are_refused(make_engine):
    engine = make_engine(max_model_len=32, kv_budget=8 * 2048)
    with pytest.raises(RequestError, match="max_model_len"):
        engine.add_request("long", list(range(40)), SamplingParams())
    with pytest.raises(CapacityError, match="raise --kv-budget"):
        engine.add_request("wide", PROMPT, SamplingParams(n=8, max_tokens=8))
    assert not engine.has_unfinished_requests()


def test_sampling_is_reproducible_by_seed(make_engine):
    engine = make_engine()
    p = dict(temperature=40.0, top_k=100, top_p=0.95)
    a = greedy(engine, PROMPT, n=16, seed=3, **p)
    b = greedy(engine, PROMPT, n=16, seed=3, **p)
    others = [greedy(engine, PROMPT, n=16, seed=s, **p) for s in range(4, 8)]
    assert a == b and any(a != c for c in others)


def test_parallel_sampling_shares_prompt_blocks(make_engine):
    engine = make_engine()
    params = SamplingParams(n=4, temperature=40.0, seed=1, max_tokens=6, ignore_eos=True)
    engine.add_request("n4", PROMPT * 3, params)
    peak = 0
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
        peak = max(peak, engine.statistics().kv["blocks_allocated"])
    unshared = 4 * -(-(len(PROMPT) * 3 + 6) // 4)
    assert peak < unshared / 2
    final = outs[-1]
    assert final.finished and len(final.finish_reasons) == 4
    texts = {}
    for o in outs:
        for d in o.deltas:
            texts.setdefault(d.index, []).extend(d.token_ids)
    assert len(texts) == 4 and len({tuple(v) for v in texts.values()}) > 1
    assert_no_leaks(engine)


def test_beam_search_returns_ranked_beams_with_true_scores(make_engine):
    engine = make_engine()
    result = engine.generate(PROMPT, SamplingParams(beam_width=4, max_tokens=6, ignore_eos=True))
    assert len(result.choices) == 4
    assert len({tuple(c.token_ids) for c in result.choices}) == 4
    scores = []
    for c in result.choices:
        full = PROMPT + c.token_ids
        lp = score(engine, full).logprob_of_next[len(PROMPT) - 1:]
        scores.append(sum(lp) / len(c.token_ids))
    assert scores == sorted(scores, reverse=True)
    g = greedy(engine, PROMPT, n=6)
    g_score = sum(score(engine, PROMPT + g).logprob_of_next[len(PROMPT) - 1:]) / 6
    assert scores[0] >= g_score - 1e-4
    assert_no_leaks(engine)


def test_session_turn_reuses_kv_and_matches_full_recompute(make_engine):
    engine = make_engine()
    first = engine.generate(PROMPT, SamplingParams(max_tokens=5, ignore_eos=True), session_id="s")
    turn2 = [33, 44, 55]
    second = engine.generate(turn2, SamplingParams(max_tokens=5, ignore_eos=True), session_id="s")
    history = PROMPT + first.choices[0].token_ids
    assert second.usage.prompt_tokens == len(history) + len(turn2)
    assert second.usage.cached_prompt_tokens == len(history) - 1
    fresh = make_engine()
    assert second.choices[0].token_ids == greedy(fresh, history + turn2, n=5)
    engine.delete_session("s")
    assert_no_leaks(engine)


def test_abort_frees_blocks_and_reports(make_engine):
    engine = make_engine()
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    engine.abort_request("a")
    outs = engine.step()
    assert outs and outs[0].finished and outs[0].finish_reasons == ["abort"]
    assert_no_leaks(engine)


def test_stop_string_cuts_text(make_engine):
    engine = make_engine()
    full = engine.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True)).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop
    res = engine.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    assert res.choices[0].finish_reason == "stop"
    assert res.choices[0].text == full[: full.index(stop)]


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(make_engine, monkeypatch):
    engine = make_engine()
    engine.add_request("boom", PROMPT, SamplingParams(max_tokens=4))
    real = engine.runner.execute

    def broken(*a, **kw):
        raise RuntimeError("injected fault")
    monkeypatch.setattr(engine.runner, "execute", broken)
    outs = engine.step()
    assert outs[0].finished and "injected fault" in outs[0].error
    monkeypatch.setattr(engine.runner, "execute", real)
    assert_no_leaks(engine)
    assert greedy(engine, PROMPT, n=3) == greedy(make_engine(), PROMPT, n=3)


def test_logprobs_of_greedy_tokens_match_the_dense_reference(make_engine, tiny_model):
    engine = make_engine()
    res = engine.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=5))
    choice = res.choices[0]
    assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
    ref = torch.log_softmax(dense_logits(tiny_model, PROMPT + choice.token_ids).float(), -1)
    for i, (tok, lp) in enumerate(zip(choice.token_ids, choice.logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        assert abs(lp.logprob - float(row[tok])) < 1e-4
        ids, vals = zip(*lp.top)
        assert len(ids) == 5 and list(vals) == sorted(vals, reverse=True)
        assert ids[0] == tok and abs(vals[0] - lp.logprob) < 1e-6       # greedy: the best one
        assert list(ids) == torch.topk(row, 5).indices.tolist()
    # the first token's log-prob is the one `kvmm score` reports at that position
    scored = score(engine, PROMPT + choice.token_ids[:1])
    assert abs(scored.logprob_of_next[-1] - choice.logprobs[0].logprob) < 1e-4
    # off by default; sampling with n > 1 reports per choice, 0 alternatives is allowed
    assert engine.generate(PROMPT, SamplingParams(max_tokens=2)).choices[0].logprobs is None
    many = engine.generate(PROMPT, SamplingParams(max_tokens=3, n=2, temperature=1.0, seed=1, logprobs=0))
    for c in many.choices:
        assert [lp.token_id for lp in c.logprobs] == c.token_ids and all(lp.top == () for lp in c.logprobs)
    assert_no_leaks(engine)


@pytest.mark.parametrize("bad", [21, -1, True, 2.0])
def test_logprobs_out_of_range_are_refused(bad):
    with pytest.raises(RequestError, match="logprobs"):
        SamplingParams(logprobs=bad)
    with pytest.raises(RequestError, match="beam"):
        SamplingParams(logprobs=1, beam_width=2)
