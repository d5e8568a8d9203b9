"""The HTTP API under pressure: 32 concurrent streaming clients of which some leave mid-stream
(every KV block comes back), fuzzed request bodies (never a 500, the daemon lives on), and a
drain that answers 503."""
from __future__ import annotations

import json
import random
import threading

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon.helpers import session_blocks, wait_idle

from .conftest import MODEL, unix_http


def _stream_and_maybe_leave(path: str, seed: int, errors: list) -> None:
    rnd = random.Random(seed)
    leave_after = rnd.choice([None, 0, 1, 3, 8])          # events read before hanging up
    body = {"model": MODEL, "prompt": "The quick brown fox " * rnd.randint(1, 4), "stream": True,
            "max_tokens": rnd.randint(20, 60), "ignore_eos": True}
    try:
        with unix_http(path) as h, h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            events = 0
            for line in r.iter_lines():
                if leave_after is not None and events >= leave_after:
                    return                                  # closing the client drops the connection
                if line.startswith("data: "):
                    events += 1
                    last = line
            assert last == "data: [DONE]"
    except Exception as exc:                                # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_32_streaming_clients_with_random_disconnects_free_every_block(http_daemon):
    before = wait_idle(http_daemon.socket)
    errors: list = []
    threads = [threading.Thread(target=_stream_and_maybe_leave, args=(http_daemon.http_socket, i, errors))
               for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    after = wait_idle(http_daemon.socket)
    assert after["kv"]["blocks_allocated"] == session_blocks(after) == session_blocks(before)
    assert after["server"]["requests_in_flight"] == 0 and after["server"]["limits"]["usage"] == []


def test_a_non_streaming_client_that_leaves_aborts_its_request(http_daemon):
    with unix_http(http_daemon.http_socket) as h:
        try:
            h.post("/v1/completions", json={"model": MODEL, "prompt": "fox", "max_tokens": 480,
                                            "ignore_eos": True}, timeout=0.3)
        except httpx.TimeoutException:
            pass
    s = wait_idle(http_daemon.socket)
    assert s["kv"]["blocks_allocated"] == session_blocks(s)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=False)
                           | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                 "content": st.text(max_size=20) | json_values})
KEYS = ["model", "messages", "prompt", "stream", "stream_options", "n", "temperature", "top_p",
        "max_tokens", "max_completion_tokens", "stop", "seed", "logprobs", "top_logprobs", "user",
        "kvmm_session", "top_k", "ignore_eos", "echo", "best_of", "logit_bias", "presence_penalty", "zzz"]
bodies = st.one_of(
    st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(message, min_size=1, max_size=3),
                           "max_tokens": st.integers(-1, 12)},
                          optional={k: json_values for k in KEYS if k not in ("model", "messages", "max_tokens")}),
    st.fixed_dictionaries({"model": st.just(MODEL), "prompt": st.text(max_size=30) | json_values,
                           "max_tokens": st.integers(-1, 12)},
                          optional={k: json_values for k in KEYS if k not in ("model", "prompt", "max_tokens")}),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
    json_values)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies, chat=st.booleans(), raw=st.binary(max_size=40))
def test_fuzzed_bodies_never_get_a_500(http_daemon, body, chat, raw):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with unix_http(http_daemon.http_socket) as h:
        r = h.post(path, content=json.dumps(body))
        assert r.status_code < 500, (body, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
        assert h.post(path, content=raw).status_code < 500


def test_the_daemon_outlives_the_fuzzing(http_daemon):
    with unix_http(http_daemon.http_socket) as h:
        assert h.get("/health").json()["status"] == "ok"
    s = wait_idle(http_daemon.socket)
    assert s["kv"]["blocks_allocated"] == session_blocks(s)
