"""The OpenAI-compatible API with the real clients: the `openai` package over the Unix socket
and TCP, curl --unix-socket, errors in OpenAI's shape, sessions and their owners, /metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.conftest import KVMM, ROOT
from tests.daemon.helpers import OTHER_GID, OTHER_UID, run_as, session_blocks, wait_idle

from .conftest import MODEL, NOBODY_KEY, ROOT_KEY, openai_unix, unix_http

USER = [{"role": "user", "content": "The quick brown fox"}]


def test_chat_completion_and_its_usage(oai):
    r = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_streamed_chat_equals_the_whole_one_and_ends_with_usage(oai):
    kw = dict(model=MODEL, messages=USER, max_completion_tokens=8, extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completions_n_seed_stop_and_temperature(oai):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=6, n=3, temperature=1.0, top_p=0.9,
              seed=7, extra_body={"ignore_eos": True})
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 18
    assert [c.text for c in a.choices] == [c.text for c in b.choices]          # same seed, same text
    greedy = oai.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12,
                                    extra_body={"ignore_eos": True}).choices[0].text
    if len(greedy) > 3:
        stop = greedy[2:4]
        cut = oai.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, stop=[stop],
                                     extra_body={"ignore_eos": True}).choices[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and greedy.startswith(cut.text)
    streamed = oai.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, stream=True,
                                      extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed) == greedy


def test_chat_logprobs_streamed_and_whole(oai):
    kw = dict(model=MODEL, messages=USER, max_tokens=6, logprobs=True, top_logprobs=4,
              extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == 6
    for t in content:
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)   # greedy
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token and t.logprob <= 0
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    streamed = [t for ch in chunks for t in ((ch.choices[0].logprobs.content or [])
                                             if ch.choices and ch.choices[0].logprobs else [])]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_match_the_msgpack_client(oai, http_daemon):
    from kvmm_daemon.client import Client
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=6, logprobs=3,
              extra_body={"ignore_eos": True})
    lp = oai.completions.create(**kw).choices[0].logprobs
    with Client(http_daemon.socket) as c:
        ref = c.generate("The quick brown fox", raw=True, max_tokens=6, ignore_eos=True, logprobs=3)
    assert lp.token_logprobs == [t["logprob"] for t in ref.choices[0]["logprobs"]]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(6)]
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert len(top) <= 3 and tok in top and list(top.values()) == sorted(top.values(), reverse=True)
    chunks = list(oai.completions.create(**kw, stream=True))
    got = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    offsets = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.text_offset]
    assert got == lp.token_logprobs and offsets == lp.text_offset


@pytest.mark.parametrize("value", [21, -1, True, 1.5])
def test_completion_logprobs_out_of_range_name_the_field(http_daemon, value):
    with unix_http(http_daemon.http_socket) as h:
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_models_and_health(oai, http_daemon):
    assert [m.id for m in oai.models.list()] == [MODEL]
    with unix_http(http_daemon.http_socket) as h:
        assert h.get("/health").json()["status"] == "ok"


def test_tcp_needs_a_key_and_the_key_is_the_tenant(http_daemon):
    with openai.OpenAI(base_url=http_daemon.http_base + "/v1", api_key=ROOT_KEY, max_retries=0) as c:
        r = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
        assert r.usage.completion_tokens >= 1
        chunks = list(c.completions.create(model=MODEL, prompt="fox", max_tokens=3, stream=True,
                                           extra_body={"ignore_eos": True}))
        assert chunks[-1].choices[0].finish_reason == "length"
    with openai.OpenAI(base_url=http_daemon.http_base + "/v1", api_key="sk-wrong-key-0000", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(http_daemon.http_base + "/health").status_code == 200       # no key needed


def test_curl_over_the_unix_socket_streams_sse(http_daemon):
    body = json.dumps({"model": MODEL, "messages": USER, "max_tokens": 4, "stream": True,
                       "stream_options": {"include_usage": True}})
    out = subprocess.run(["curl", "-sSN", "--unix-socket", http_daemon.http_socket,
                          "http://localhost/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] >= 1
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_greedy_http_equals_kvmm_run(oai, tiny_model):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = lambda *a: json.loads(subprocess.run(
        [KVMM, "run", "--model", str(tiny_model), "--threads", "1", "--max-tokens", "10", "--json", *a],
        capture_output=True, text=True, timeout=120, check=True, env=env).stdout)
    raw, chat = run("--raw", "Paged attention"), run("Paged attention")
    c = oai.completions.create(model=MODEL, prompt="Paged attention", max_tokens=10, temperature=0)
    assert c.choices[0].text == raw["text"] and c.usage.prompt_tokens == len(raw["prompt_token_ids"])
    m = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paged attention"}],
                                    max_tokens=10, temperature=0)
    assert m.choices[0].message.content == chat["text"]
    assert m.usage.prompt_tokens == len(chat["prompt_token_ids"])


@pytest.mark.parametrize("body,status,param", [
    ({"model": MODEL, "messages": USER, "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "messages": USER, "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": USER, "max_tokens": "9"}, 400, "max_tokens"),
    ({"model": MODEL, "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "messages": USER, "logprobs": "yes"}, 400, "logprobs"),
    ({"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": USER, "frobnicate": 1}, 400, "frobnicate"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": USER, "kvmm_session": "../etc"}, 400, "kvmm_session"),
    ({"model": "gpt-4o", "messages": USER}, 404, "model"),
    ({"model": MODEL, "messages": USER, "n": 16, "max_tokens": 400}, 429, None),  # over max_kv_blocks_per_uid
])
def test_errors_have_openai_shape_and_status(http_daemon, body, status, param):
    with unix_http(http_daemon.http_socket) as h:
        r = h.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_bad_json_and_unknown_routes(http_daemon):
    with unix_http(http_daemon.http_socket) as h:
        assert h.post("/v1/completions", content=b"{nope").status_code == 400
        too_long = h.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 600, "max_tokens": 1})
        assert too_long.status_code == 400 and "max_model_len" in too_long.json()["error"]["message"]
        assert h.get("/v1/engines").json()["error"]["type"] == "not_found_error"
        assert h.get("/v1/completions").status_code == 405


def test_session_turns_reuse_kv_and_other_tenants_are_refused(http_daemon, oai):
    first = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=4,
                                        extra_body={"kvmm_session": "http-chat", "ignore_eos": True})
    second = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "and then?"}],
                                         max_tokens=4, extra_body={"kvmm_session": "http-chat", "ignore_eos": True})
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0

    def as_nobody(path: str, ref: str) -> tuple[int, str | None]:
        with unix_http(path) as h:
            r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2,
                                                     "kvmm_session": ref})
        return r.status_code, r.json().get("error", {}).get("param")

    assert run_as(OTHER_UID, OTHER_GID, as_nobody, http_daemon.http_socket, "0:http-chat") == (403, "kvmm_session")
    r = httpx.post(http_daemon.http_base + "/v1/completions", headers={"Authorization": f"Bearer {NOBODY_KEY}"},
                   json={"model": MODEL, "prompt": "x", "max_tokens": 2, "kvmm_session": "0:http-chat"})
    assert r.status_code == 403 and r.json()["error"]["param"] == "kvmm_session"
    from kvmm_daemon.client import Client
    with Client(http_daemon.socket) as c:
        c.delete_session("http-chat")
        assert "http-chat" not in [s["session"] for s in c.sessions()]


def test_resent_history_hits_the_prefix_cache(oai):
    history = [{"role": "system", "content": "You answer in one short sentence about foxes and dogs."},
               {"role": "user", "content": "What does the quick brown fox do all day long in the forest?"}]
    oai.chat.completions.create(model=MODEL, messages=history, max_tokens=2)
    again = oai.chat.completions.create(model=MODEL, messages=history + [
        {"role": "assistant", "content": "It runs."}, {"role": "user", "content": "Why?"}], max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_metrics_in_prometheus_format(oai, http_daemon):
    oai.completions.create(model=MODEL, prompt="fox", max_tokens=3, extra_body={"ignore_eos": True})
    with unix_http(http_daemon.http_socket) as h:
        r = h.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("kvmm:request_success", "kvmm:prompt_tokens", "kvmm:generation_tokens",
                 "kvmm:time_to_first_token_seconds", "kvmm:inter_token_latency_seconds", "kvmm:kv_blocks",
                 "kvmm:prefix_cache_hits", "kvmm:num_preemptions", "kvmm:swap_in_bytes", "kvmm:swap_out_bytes",
                 "kvmm:weight_stall_seconds", "kvmm:num_requests_running", "kvmm:num_requests_waiting"):
        assert name in fams, name
    assert sum(s.value for s in fams["kvmm:generation_tokens"].samples) >= 3
    assert {s.labels["state"] for s in fams["kvmm:kv_blocks"].samples} == {"free", "allocated", "cached"}
    assert httpx.get(http_daemon.http_base + "/metrics").status_code == 401
