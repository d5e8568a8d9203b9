"""The real daemon (kvmm serve on a tiny model): operations, streaming, sessions, cancel and
robustness against bad input. One daemon serves the whole module."""
from __future__ import annotations

import socket

import pytest

from kvmm_daemon.client import (Client, InvalidRequest, NotFound, UnknownOperation, Conflict,
                                UnsupportedVersion)
from kvmm_daemon import protocol as P

from .helpers import RawConn, session_blocks, wait_idle

LONG = dict(max_tokens=300, ignore_eos=True)


def test_health_and_stats_shape(daemon):
    with Client(daemon.socket) as c:
        h = c.health()
        assert h["status"] == "ok" and h["protocol"] == P.PROTOCOL_VERSION and h["uid"] == 0
        s = c.stats()
    for key in ("blocks_total", "blocks_allocated", "blocks_cached", "blocks_free"):
        assert isinstance(s["kv"][key], int)
    assert s["kv"]["blocks_total"] == s["kv"]["blocks_allocated"] + s["kv"]["blocks_cached"] + s["kv"]["blocks_free"]
    assert {"running", "waiting"} <= set(s["requests"])
    assert s["clients"]["connected"] >= 1


def test_stream_deltas_add_up_to_the_result(daemon):
    with Client(daemon.socket) as c:
        with c.stream("The quick brown fox", raw=True, max_tokens=12, ignore_eos=True) as s:
            deltas = list(s)
        r = s.result
    assert s.request_id == r.request_id and s.request_id.startswith("r")
    assert "".join(d.text for d in deltas) == r.text
    assert [t for d in deltas for t in d.token_ids] == r.token_ids
    assert r.usage["completion_tokens"] == len(r.token_ids) == 12
    assert r.usage["prompt_tokens"] == len(r.prompt_token_ids) and r.finish_reason == "length"
    assert r.timings["ttft_s"] > 0


def test_logprobs_ride_on_deltas_and_the_result_only_when_asked(daemon):
    with Client(daemon.socket) as c:
        with c.stream("The quick brown fox", raw=True, max_tokens=6, ignore_eos=True, logprobs=3) as s:
            deltas = list(s)
        r = s.result
        plain = c.generate("The quick brown fox", raw=True, max_tokens=2)
        with pytest.raises(InvalidRequest, match="logprobs"):
            c.generate("x", max_tokens=1, logprobs=21)
    streamed = [lp for d in deltas for lp in d.logprobs]
    assert streamed == r.choices[0]["logprobs"] and [lp["token_id"] for lp in streamed] == r.token_ids
    for lp in streamed:
        assert len(lp["top_logprobs"]) == 3 and lp["top_logprobs"][0] == [lp["token_id"], lp["logprob"]]
    assert "logprobs" not in plain.choices[0]


def test_greedy_is_the_same_streamed_or_not_and_by_token_ids(daemon):
    with Client(daemon.socket) as c:
        a = c.generate("Paged attention", raw=True, max_tokens=10, ignore_eos=True)
        with c.stream("Paged attention", raw=True, max_tokens=10, ignore_eos=True) as s:
            list(s)
        b = c.generate(token_ids=a.prompt_token_ids, max_tokens=10, ignore_eos=True)
    assert a.token_ids == s.result.token_ids == b.token_ids


def test_parallel_choices_and_chat_messages(daemon):
    with Client(daemon.socket) as c:
        r = c.generate(messages=[{"role": "user", "content": "hi"}], n=3, temperature=1.0, seed=5,
                       max_tokens=6, ignore_eos=True)
    assert len(r.choices) == 3 and [ch["index"] for ch in r.choices] == [0, 1, 2]
    assert all(len(ch["token_ids"]) == 6 for ch in r.choices)
    assert r.usage["completion_tokens"] == 18
    assert r.as_dict()["choices"] == r.choices


def test_session_turn_reuses_kv(daemon):
    with Client(daemon.socket) as c:
        name = c.open_session("reuse")
        assert name == "reuse"
        with pytest.raises(Conflict):
            c.open_session("reuse")
        t1 = c.generate("The dog sleeps; the fox runs away.", raw=True, session=name, max_tokens=8, ignore_eos=True)
        t2 = c.generate(" The quick brown fox", raw=True, session=name, max_tokens=8, ignore_eos=True)
        history = t1.usage["prompt_tokens"] + t1.usage["completion_tokens"]
        assert t1.usage["cached_prompt_tokens"] == 0
        assert t2.usage["prompt_tokens"] == history + len(t2.prompt_token_ids)
        assert t2.usage["cached_prompt_tokens"] > 0
        listed = {s["session"]: s for s in c.sessions()}
        assert listed["reuse"]["num_tokens"] == t2.usage["prompt_tokens"] + t2.usage["completion_tokens"]
        assert listed["reuse"]["owner_uid"] == 0
        c.delete_session(name)
        assert "reuse" not in {s["session"] for s in c.sessions()}
        with pytest.raises(NotFound):
            c.delete_session(name)
    s = wait_idle(daemon.socket)
    assert s["kv"]["blocks_allocated"] == session_blocks(s)


def test_cancel_mid_stream(daemon):
    with Client(daemon.socket) as c:
        with c.stream("The quick brown fox", raw=True, **LONG) as s:
            it = iter(s)
            next(it)
            assert [r["request_id"] for r in c.requests()] == [s.request_id]
            s.cancel()
            rest = list(it)
        assert s.result.finish_reason == "abort"
        assert len(s.result.token_ids) < 300 and len(rest) < 300
        with pytest.raises(NotFound):
            c.cancel(s.request_id)
    s = wait_idle(daemon.socket)
    assert s["kv"]["blocks_allocated"] == session_blocks(s)


def test_leaving_the_stream_early_cancels(daemon):
    with Client(daemon.socket) as c:
        with c.stream("The quick", raw=True, **LONG) as s:
            for _ in s:
                break
        assert s.result.finish_reason == "abort"
        assert c.health()["status"] == "ok"             # connection still usable


def test_client_errors_are_typed(daemon):
    with Client(daemon.socket) as c:
        with pytest.raises(InvalidRequest, match="max_tokens"):
            c.generate("x", max_tokens=0)
        with pytest.raises(InvalidRequest, match="token ids"):
            c.generate(token_ids=[10 ** 6])
        with pytest.raises(UnknownOperation):
            c.call("shutdown")
        with pytest.raises(InvalidRequest):
            c.call("health", extra=1)
        assert c.health()["status"] == "ok"


@pytest.mark.parametrize("payload,code", [
    (P.HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1", "bad_frame"),
    (P.HEADER.pack(4) + b"\x93\x01\x02\x03", "bad_frame"),
    (P.encode_frame({"v": 1, "id": 4, "op": "reboot"}), "unknown_op"),
    (P.encode_frame({"v": 9, "id": 4, "op": "health"}), "unsupported_version"),
    (P.encode_frame({"v": 1, "id": 4, "op": "generate", "prompt": 17}), "invalid_request"),
    (P.encode_frame({"v": 1, "id": 4, "op": "cancel", "request_id": ["r1"]}), "invalid_request"),
    (P.encode_frame({"v": 1, "id": "4", "op": "health"}), "invalid_request"),
])
def test_bad_frames_get_an_error_and_the_connection_survives(daemon, payload, code):
    conn = RawConn(daemon.socket)
    conn.send_bytes(payload)
    reply = conn.recv()
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert conn.call("health", id=9)["result"]["status"] == "ok"
    conn.close()


def test_oversized_frame_closes_only_that_connection(daemon):
    bystander = RawConn(daemon.socket)
    conn = RawConn(daemon.socket)
    conn.send_bytes(P.HEADER.pack(1 << 30) + b"x" * 100)
    reply = conn.recv()
    assert reply["code"] == "frame_too_large" and reply["id"] is None
    assert conn.recv() is None                          # then a clean close
    conn.close()
    assert bystander.call("health")["result"]["status"] == "ok"
    bystander.close()


def test_truncated_frames_and_garbage_do_not_hurt_the_daemon(daemon):
    for data in (P.encode_frame({"v": 1, "id": 1, "op": "health"})[:-3], b"\x00\x00", bytes(range(256)) * 40):
        conn = RawConn(daemon.socket)
        conn.send_bytes(data)
        conn.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.socket)
    s.close()                                           # connect and leave at once
    with Client(daemon.socket) as c:
        assert c.health()["status"] == "ok"
        assert c.generate("ok", raw=True, max_tokens=2, ignore_eos=True).usage["completion_tokens"] == 2


def test_disconnect_mid_stream_cancels_and_frees_blocks(daemon):
    before = wait_idle(daemon.socket)
    for abrupt in (False, True):
        conn = RawConn(daemon.socket)
        conn.send({"v": 1, "id": 1, "op": "generate", "prompt": "The quick brown fox", "raw": True,
                   "params": {"max_tokens": 400, "ignore_eos": True}})
        assert conn.recv()["type"] == "accepted"
        assert conn.recv()["type"] == "delta"
        with Client(daemon.socket) as c:
            assert c.stats()["requests"]["running"] == 1
        conn.abort() if abrupt else conn.close()
        after = wait_idle(daemon.socket)
        assert after["kv"]["blocks_allocated"] == session_blocks(after) == session_blocks(before)
        assert after["server"]["requests_in_flight"] == 0


def test_several_streams_on_one_connection(daemon):
    conn = RawConn(daemon.socket)
    for i in (1, 2, 3):
        conn.send({"v": 1, "id": i, "op": "generate", "prompt": "fox " * i, "raw": True,
                   "params": {"max_tokens": 5, "ignore_eos": True}})
    done = {}
    while len(done) < 3:
        msg = conn.recv()
        if msg["type"] == "done":
            done[msg["id"]] = msg
    assert all(len(m["choices"][0]["token_ids"]) == 5 for m in done.values())
    assert len({m["request_id"] for m in done.values()}) == 3
    conn.close()


def test_capacity_error_for_a_request_that_can_never_fit(daemon):
    from kvmm_daemon.client import CapacityExceeded
    with Client(daemon.socket) as c:
        with pytest.raises((CapacityExceeded, InvalidRequest)):
            c.generate(token_ids=[5] * 600, max_tokens=4)


def test_unsupported_version_from_client(daemon):
    conn = RawConn(daemon.socket)
    conn.send({"v": 2, "id": 3, "op": "stats"})
    r = conn.recv()
    assert r["code"] == "unsupported_version" and r["id"] == 3
    with pytest.raises(UnsupportedVersion):
        from kvmm_daemon.client import error_from_reply
        raise error_from_reply(r)
    conn.close()


def test_generate_with_a_new_session_name_opens_it(daemon):
    with Client(daemon.socket) as c:
        r1 = c.generate("The dog", raw=True, session="implicit", max_tokens=3, ignore_eos=True)
        r2 = c.generate(" and the fox", raw=True, session="implicit", max_tokens=3, ignore_eos=True)
        assert r2.usage["prompt_tokens"] == r1.usage["prompt_tokens"] + 3 + len(r2.prompt_token_ids)
        assert "implicit" in [s["session"] for s in c.sessions()]
        c.delete_session("implicit")
    wait_idle(daemon.socket)
