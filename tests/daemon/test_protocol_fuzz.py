"""Hypothesis fuzz of the frame decoder and request validation (pure functions, no daemon).

The property: whatever bytes or maps arrive, the decoder and `parse_request` either return
a well-formed result or raise ProtocolError with a known code — never anything else. Case
counts sum to more than 10,000.
"""
import functools

from hypothesis import HealthCheck, given, settings, strategies as st

from kvmm_daemon import protocol as P
from kvmm_daemon.engine.sampling_params import SamplingParams

# the server's parse: the sampling map becomes SamplingParams
parse = functools.partial(P.parse_request, make_params=SamplingParams.from_dict)



def fuzz(cases: int):
    return settings(max_examples=cases, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.text(max_size=6), scalars, max_size=3))

OP_KEYS = ["v", "id", "op", "prompt", "messages", "token_ids", "raw", "params", "session", "stream",
           "request_id"]
PARAM_KEYS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "n", "beam_width", "stop",
              "ignore_eos", "other"]

# maps that look like requests: right keys, values sometimes right, sometimes not
param_maps = st.dictionaries(st.sampled_from(PARAM_KEYS), st.one_of(
    st.integers(-5, 40), st.floats(-2, 3), st.lists(st.text(max_size=3), max_size=3), values), max_size=5)
messages = st.lists(st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "", 3]),
                                                     "content": st.one_of(st.text(max_size=10), st.none())}),
                              values), max_size=3)
request_like = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), values), "id": st.one_of(st.integers(0, (1 << 64) - 1), values),
     "op": st.one_of(st.sampled_from(list(P.OPS)), values)},
    optional={"prompt": st.one_of(st.text(max_size=30), values),
              "messages": messages,
              "token_ids": st.one_of(st.lists(st.integers(-3, 1 << 32), max_size=6), values),
              "raw": st.one_of(st.booleans(), values), "stream": st.one_of(st.booleans(), values),
              "params": st.one_of(param_maps, values),
              "session": st.one_of(st.sampled_from(["a", "chat", "0:x", "1000:a.b-c", "-x", "a" * 65, "", "x/y"]), values),
              "request_id": st.one_of(st.sampled_from(["r1", "r99", "r", "x1", "r-1"]), values),
              "junk": values})


def check_parse(msg):
    try:
        r = parse(msg)
    except P.ProtocolError as exc:
        assert isinstance(exc.code, P.ErrorCode) and exc.message
        assert exc.id is None or (isinstance(exc.id, int) and exc.id == msg.get("id"))
        return
    assert r.id == msg["id"] and msg["v"] == P.PROTOCOL_VERSION and msg["op"] in P.OPS
    if isinstance(r, P.GenerateRequest):
        assert sum(x is not None for x in (r.prompt, r.messages, r.token_ids)) == 1
        assert r.params.max_tokens >= 1 and r.params.num_choices >= 1


@fuzz(4000)
@given(request_like)
def test_request_validation_never_crashes(msg):
    check_parse(msg)


@fuzz(2000)
@given(st.dictionaries(st.sampled_from(OP_KEYS), values, max_size=6))
def test_arbitrary_maps_never_crash(msg):
    check_parse(msg)


@fuzz(2500)
@given(st.binary(max_size=200))
def test_random_bodies_decode_or_bad_frame(body):
    try:
        obj = P.decode_body(body)
    except P.ProtocolError as exc:
        assert exc.code is P.ErrorCode.BAD_FRAME
        return
    assert isinstance(obj, dict)
    check_parse(obj)


@fuzz(1500)
@given(st.lists(request_like, min_size=1, max_size=4), st.lists(st.integers(1, 64), max_size=20),
       st.binary(max_size=8))
def test_decoder_splits_any_chunking(msgs, cuts, tail):
    """Frames come back whole and in order however the stream is cut; a trailing partial
    frame stays pending."""
    encoded = [P.encode_frame(m) for m in msgs]
    data = b"".join(encoded) + tail[:3]            # < 4 bytes: never a complete header
    dec = P.FrameDecoder(P.CLIENT_MAX_FRAME)
    got, pos = [], 0
    for cut in cuts + [len(data)]:
        got += dec.feed(data[pos:pos + cut])
        pos += cut
    got += dec.feed(data[pos:])
    assert got == [e[4:] for e in encoded]
    assert dec.pending == len(tail[:3])


@fuzz(1000)
@given(st.binary(max_size=64), st.integers(1, 300))
def test_decoder_with_small_limit_never_crashes(data, limit):
    dec = P.FrameDecoder(max_frame=limit)
    try:
        for body in dec.feed(data):
            assert len(body) <= limit
    except P.ProtocolError as exc:
        assert exc.code is P.ErrorCode.FRAME_TOO_LARGE
