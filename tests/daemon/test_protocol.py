"""Frames and request validation of kvmm_daemon/protocol.py."""
import functools

import msgpack
import pytest

from kvmm_daemon import protocol as P
from kvmm_daemon.engine.sampling_params import SamplingParams

# the server's parse: the sampling map becomes SamplingParams
parse = functools.partial(P.parse_request, make_params=SamplingParams.from_dict)


def frame(obj) -> bytes:
    return P.encode_frame(obj)


def req(op, **kw):
    return {"v": P.PROTOCOL_VERSION, "id": 7, "op": op, **kw}


def test_roundtrip_through_decoder_in_pieces():
    msgs = [req("health"), req("generate", prompt="hi", params={"max_tokens": 3})]
    data = b"".join(frame(m) for m in msgs)
    dec = P.FrameDecoder()
    bodies = []
    for i in range(len(data)):                      # one byte at a time
        bodies += dec.feed(data[i:i + 1])
    assert [P.decode_body(b) for b in bodies] == msgs
    assert dec.pending == 0


def test_truncated_frame_is_pending_not_returned():
    data = frame(req("stats"))
    dec = P.FrameDecoder()
    assert dec.feed(data[:-1]) == []
    assert dec.pending == len(data) - 1


def test_oversized_length_prefix_breaks_the_stream():
    dec = P.FrameDecoder(max_frame=100)
    with pytest.raises(P.ProtocolError) as e:
        dec.feed(P.HEADER.pack(101))
    assert e.value.code is P.ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(P.ProtocolError):
        dec.feed(frame(req("health")))


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x01", msgpack.packb([1, 2]),
                                  msgpack.packb({1: 2}, strict_types=False)[:-1],
                                  msgpack.packb(msgpack.ExtType(5, b"x")), b"\x81\xa1a" * 3])
def test_bad_bodies_raise_bad_frame(body):
    with pytest.raises(P.ProtocolError) as e:
        P.decode_body(body)
    assert e.value.code is P.ErrorCode.BAD_FRAME


def test_deep_nesting_is_bad_frame_not_a_crash():
    body = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(P.ProtocolError):
        P.decode_body(body)


def test_parse_every_op():
    assert isinstance(parse(req("health")), P.HealthRequest)
    assert isinstance(parse(req("stats")), P.StatsRequest)
    assert isinstance(parse(req("requests")), P.ListRequestsRequest)
    assert parse(req("cancel", request_id="r12")) == P.CancelRequest(7, "r12")
    assert parse(req("session.open")) == P.SessionOpenRequest(7, None)
    assert parse(req("session.open", session="work")) == P.SessionOpenRequest(7, "work")
    assert parse(req("session.list")) == P.SessionListRequest(7)
    assert parse(req("session.delete", session="1000:work")) == P.SessionDeleteRequest(7, "1000:work")


def test_parse_generate_fields():
    r = parse(req("generate", messages=[{"role": "user", "content": "hi"}],
                            params={"max_tokens": 5, "temperature": 0.5, "stop": ["\n"], "seed": 3},
                            session="chat", stream=False))
    assert r.messages == (("user", "hi"),) and r.prompt is None and r.token_ids is None
    assert r.params.max_tokens == 5 and r.params.temperature == 0.5 and r.params.stop == ("\n",)
    assert r.session == "chat" and r.stream is False and r.raw is False
    r = parse(req("generate", token_ids=[1, 2, 3]))
    assert r.token_ids == (1, 2, 3) and r.stream is True and r.params.max_tokens == 128


@pytest.mark.parametrize("msg,code,needle", [
    ({"v": 1, "op": "health"}, "invalid_request", "id"),
    ({"v": 1, "id": -1, "op": "health"}, "invalid_request", "id"),
    ({"v": 1, "id": True, "op": "health"}, "invalid_request", "id"),
    ({"v": 2, "id": 1, "op": "health"}, "unsupported_version", "v=1"),
    ({"v": True, "id": 1, "op": "health"}, "unsupported_version", "version"),
    ({"v": 1, "id": 1, "op": "launch"}, "unknown_op", "launch"),
    ({"v": 1, "id": 1, "op": 5}, "unknown_op", "known ops"),
    ({"v": 1, "id": 1, "op": "health", "x": 1}, "invalid_request", "'x'"),
    (req("generate"), "invalid_request", "exactly one"),
    (req("generate", prompt="a", token_ids=[1]), "invalid_request", "exactly one"),
    (req("generate", prompt=5), "invalid_request", "prompt must be a string"),
    (req("generate", token_ids=[]), "invalid_request", "token_ids"),
    (req("generate", token_ids=[1, -2]), "invalid_request", "token_ids"),
    (req("generate", token_ids=[True]), "invalid_request", "token_ids"),
    (req("generate", messages=[{"role": "user"}]), "invalid_request", "messages[0]"),
    (req("generate", prompt="a", params={"max_tokens": "5"}), "invalid_request", "max_tokens"),
    (req("generate", prompt="a", params={"max_tokens": 0}), "invalid_request", "max_tokens"),
    (req("generate", prompt="a", params={"temperature": float("nan")}), "invalid_request", "finite"),
    (req("generate", prompt="a", params={"bogus": 1}), "invalid_request", "bogus"),
    (req("generate", prompt="a", params=[1]), "invalid_request", "params"),
    (req("generate", prompt="a", raw="yes"), "invalid_request", "raw"),
    (req("generate", prompt="a", session="../etc"), "invalid_request", "session"),
    (req("cancel", request_id="12"), "invalid_request", "request_id"),
    (req("session.open", session="a:b"), "invalid_request", "session"),
    (req("session.delete"), "invalid_request", "session"),
])
def test_invalid_requests_name_the_problem(msg, code, needle):
    with pytest.raises(P.ProtocolError) as e:
        parse(msg)
    assert e.value.code.value == code
    assert needle in e.value.message
    if isinstance(msg.get("id"), int) and not isinstance(msg.get("id"), bool) and msg["id"] >= 0:
        assert e.value.id == msg["id"]


def test_error_reply_shape():
    r = P.error_reply(3, P.ErrorCode.NOT_FOUND, "no such thing")
    assert r == {"v": 1, "id": 3, "type": "error", "code": "not_found", "message": "no such thing"}
    assert P.decode_body(frame(r)[4:]) == r
