"""The kvmm wire protocol: length-prefixed msgpack frames, typed requests, reply maps.

The one module both ends import: the daemon's msgpack server (and the HTTP API, for the
error codes) and the clients of kvmm_daemon/client.py. It is a leaf: it imports neither the
server package nor the engine, so a client does not load torch. The sampling parameters of
a generate are the engine's business: `parse_request` checks that they form a map of finite
scalars and hands them to the `make_params` its caller gives (the server passes
`SamplingParams.from_dict`; a ValueError/KvmmError from it is an INVALID_REQUEST).

A frame is a 4-byte big-endian unsigned length N followed by N bytes holding one msgpack map.
Every request map carries `v` (protocol version, `PROTOCOL_VERSION`), `id` (a client-chosen
integer that the replies echo, so one connection can carry several requests at once) and `op`;
the other keys depend on the op. Replies carry `v`, `id` and `type` ("result", "accepted",
"delta", "done" or "error"). docs/protocol.md is the reference for people; this module is the
one for code: `parse_request` turns a decoded map into one of the frozen request classes below
or raises `ProtocolError` with an `ErrorCode`.

Prior art: the framing is the classic one (Kafka, Postgres, D-Bus all prefix a length); the
request/stream/final shape follows the OpenAI/vLLM streaming API. Left out on purpose: a
handshake (the version rides on every request, so there is no connection state to negotiate),
compression, and msgpack extension types (rejected as bad input).
"""
from __future__ import annotations

import enum
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from kvmm_daemon.errors import KvmmError

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/kvmm/kvmm.sock"
HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20          # requests: a prompt of ~1 MiB is more than any context
CLIENT_MAX_FRAME = 64 << 20          # replies: a long final message with every token id
MAX_ID = (1 << 63) - 1
MAX_TOKEN_ID = (1 << 31) - 1
SESSION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SESSION_REF_RE = re.compile(r"^(?:([0-9]{1,10}):)?([A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
REQUEST_ID_RE = re.compile(r"^r[0-9]{1,19}$")


class ErrorCode(str, enum.Enum):
    """Why a request failed; the client library maps each to an exception class."""

    BAD_FRAME = "bad_frame"                  # not msgpack, or not a map
    FRAME_TOO_LARGE = "frame_too_large"      # length prefix above the limit; connection closed
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    INVALID_REQUEST = "invalid_request"      # missing/extra keys, wrong types, bad values
    NOT_FOUND = "not_found"                  # no such request or session (or not yours)
    PERMISSION_DENIED = "permission_denied"  # it exists but belongs to another uid
    CONFLICT = "conflict"                    # session already exists / is busy
    LIMIT_EXCEEDED = "limit_exceeded"        # a per-uid or server-wide limit
    CAPACITY = "capacity"                    # the KV budget can never hold the request
    SHUTTING_DOWN = "shutting_down"          # the daemon is draining
    ENGINE_ERROR = "engine_error"            # the engine failed this request
    INTERNAL = "internal"                    # a bug in the daemon; see its log


class ProtocolError(Exception):
    """A frame or request the server rejects; `id` is the request id when it could be read."""

    def __init__(self, code: ErrorCode, message: str, *, id: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


# ---------------------------------------------------------------------------------- frames

def encode_frame(message: dict[str, Any]) -> bytes:
    """One frame: length prefix + msgpack body."""
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """The msgpack map of one frame body; ProtocolError(BAD_FRAME) for anything else."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, UnicodeDecodeError, OverflowError, RecursionError,
            msgpack.UnpackException) as exc:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame holds a {type(obj).__name__}, not a map")
    return obj


class FrameDecoder:
    """Cuts a byte stream into frame bodies.

    Attributes:
      max_frame: largest body accepted; a longer length prefix raises FRAME_TOO_LARGE, after
        which the stream cannot be resynchronised and the decoder refuses further input.
      _buf: bytes received but not yet returned; it never holds a complete frame after
        `frames()` has returned.
    """

    __slots__ = ("max_frame", "_buf", "_broken")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        assert max_frame > 0
        self.max_frame = max_frame
        self._buf = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the bodies of every frame now complete."""
        if self._broken:
            raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, "stream is past an oversized frame")
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_frame:
                self._broken = True
                raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                                    f"frame of {n} bytes exceeds the limit of {self.max_frame}; "
                                    f"send a shorter prompt or raise max_frame_bytes")
            if len(self._buf) < HEADER.size + n:
                break
            out.append(bytes(self._buf[HEADER.size:HEADER.size + n]))
            del self._buf[:HEADER.size + n]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame; nonzero at EOF means the peer truncated a frame."""
        return len(self._buf)


# ---------------------------------------------------------------------------------- requests

@dataclass(frozen=True, slots=True)
class GenerateRequest:
    id: int
    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None     # (role, content) pairs
    token_ids: tuple[int, ...] | None
    raw: bool
    params: Any                                      # what make_params made of the params map
    session: str | None                              # a session reference, see SESSION_REF_RE
    stream: bool


@dataclass(frozen=True, slots=True)
class CancelRequest:
    id: int
    request_id: str


@dataclass(frozen=True, slots=True)
class ListRequestsRequest:
    id: int


@dataclass(frozen=True, slots=True)
class SessionOpenRequest:
    id: int
    session: str | None                              # None: the server picks a name


@dataclass(frozen=True, slots=True)
class SessionListRequest:
    id: int


@dataclass(frozen=True, slots=True)
class SessionDeleteRequest:
    id: int
    session: str


@dataclass(frozen=True, slots=True)
class StatsRequest:
    id: int


@dataclass(frozen=True, slots=True)
class HealthRequest:
    id: int


@dataclass(frozen=True, slots=True)
class StepsRequest:
    id: int


Request = (GenerateRequest | CancelRequest | ListRequestsRequest | SessionOpenRequest
           | SessionListRequest | SessionDeleteRequest | StatsRequest | HealthRequest | StepsRequest)

_COMMON = frozenset({"v", "id", "op"})


def _invalid(rid: int, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message, id=rid)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _session_ref(rid: int, value: Any, *, key: str = "session") -> str:
    if not isinstance(value, str) or not SESSION_REF_RE.match(value):
        raise _invalid(rid, f"{key} {value!r} is not a session name; use 1-64 of A-Z a-z 0-9 . _ - "
                            f"(root may prefix another uid as UID:NAME)")
    return value


def params_map(params: dict[str, Any]) -> dict[str, Any]:
    """The default `make_params`: the checked map itself."""
    return params


def parse_request(msg: dict[str, Any], *, make_params: Callable[[dict[str, Any]], Any] = params_map) -> Request:
    """Validate one decoded request map into a typed request; ProtocolError otherwise."""
    raw_id = msg.get("id")
    rid = raw_id if _is_int(raw_id) and 0 <= raw_id <= MAX_ID else None
    if rid is None:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"id {raw_id!r} must be an integer 0..2^63-1")
    v = msg.get("v")
    if v != PROTOCOL_VERSION or not _is_int(v):
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {v!r} is not supported; this daemon speaks "
                            f"v={PROTOCOL_VERSION} (upgrade the client or the daemon)", id=rid)
    op = msg.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(ErrorCode.UNKNOWN_OP,
                            f"unknown op {op!r}; known ops: {', '.join(OPS)}", id=rid)
    keys, parse = OPS[op]
    extra = set(msg) - _COMMON - keys
    if extra:
        names = ", ".join(sorted(map(repr, extra)))
        raise _invalid(rid, f"op {op} does not take key(s) {names}; "
                            f"allowed: {', '.join(sorted(keys)) or 'none'}")
    return parse(rid, msg, make_params)


def _parse_cancel(rid: int, msg: dict[str, Any], make_params: Any) -> CancelRequest:
    req_id = msg.get("request_id")
    if not isinstance(req_id, str) or not REQUEST_ID_RE.match(req_id):
        raise _invalid(rid, f"request_id {req_id!r} is not a request id (like 'r12')")
    return CancelRequest(rid, req_id)


def _parse_session_open(rid: int, msg: dict[str, Any], make_params: Any) -> SessionOpenRequest:
    name = msg.get("session")
    if name is not None:
        if not isinstance(name, str) or not SESSION_NAME_RE.match(name):
            raise _invalid(rid, f"session {name!r} is not a session name; use 1-64 of "
                                f"A-Z a-z 0-9 . _ - starting with a letter or digit")
    return SessionOpenRequest(rid, name)


def _parse_session_delete(rid: int, msg: dict[str, Any], make_params: Any) -> SessionDeleteRequest:
    if "session" not in msg:
        raise _invalid(rid, "session.delete needs the key 'session'")
    return SessionDeleteRequest(rid, _session_ref(rid, msg["session"]))


def _parse_generate(rid: int, msg: dict[str, Any], make_params: Callable[[dict[str, Any]], Any]) -> GenerateRequest:
    given = [k for k in ("prompt", "messages", "token_ids") if msg.get(k) is not None]
    if len(given) != 1:
        raise _invalid(rid, f"generate needs exactly one of prompt, messages, token_ids "
                            f"(got {', '.join(given) or 'none'})")
    prompt = msg.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise _invalid(rid, f"prompt must be a string, not {type(prompt).__name__}")
    messages = None
    if msg.get("messages") is not None:
        messages = _parse_messages(rid, msg["messages"])
    token_ids = None
    if msg.get("token_ids") is not None:
        ids = msg["token_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in ids)):
            raise _invalid(rid, "token_ids must be a non-empty list of non-negative integers")
        token_ids = tuple(ids)
    flags = {}
    for key, default in (("raw", False), ("stream", True)):
        value = msg.get(key, default)
        if not isinstance(value, bool):
            raise _invalid(rid, f"{key} must be true or false, not {value!r}")
        flags[key] = value
    params_in = msg.get("params", {})
    if not isinstance(params_in, dict):
        raise _invalid(rid, f"params must be a map of sampling parameters, not {type(params_in).__name__}")
    for key, value in params_in.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise _invalid(rid, f"sampling parameter {key}={value!r} is not a finite number")
        if _is_int(value) and not -(1 << 63) <= value < (1 << 64):
            raise _invalid(rid, f"sampling parameter {key}={value!r} is out of range")
    try:
        params = make_params(params_in)
    except (KvmmError, ValueError, TypeError) as exc:
        raise _invalid(rid, str(exc)) from None
    session = msg.get("session")
    if session is not None:
        session = _session_ref(rid, session)
    return GenerateRequest(rid, prompt, messages, token_ids, flags["raw"], params, session,
                           flags["stream"])


def _simple(cls: type) -> Callable[[int, dict[str, Any], Any], Any]:
    return lambda rid, msg, make_params: cls(rid)


# op -> (keys allowed besides v/id/op, parser)
OPS: dict[str, tuple[frozenset[str], Callable[[int, dict[str, Any], Any], Request]]] = {
    "generate": (frozenset({"prompt", "messages", "token_ids", "raw", "params", "session", "stream"}),
                 _parse_generate),
    "cancel": (frozenset({"request_id"}), _parse_cancel),
    "requests": (frozenset(), _simple(ListRequestsRequest)),
    "session.open": (frozenset({"session"}), _parse_session_open),
    "session.list": (frozenset(), _simple(SessionListRequest)),
    "session.delete": (frozenset({"session"}), _parse_session_delete),
    "stats": (frozenset(), _simple(StatsRequest)),
    "health": (frozenset(), _simple(HealthRequest)),
    "steps": (frozenset(), _simple(StepsRequest)),
}


def _parse_messages(rid: int, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _invalid(rid, "messages must be a non-empty list of {role, content} maps")
    out = []
    for i, m in enumerate(value):
        if (not isinstance(m, dict) or set(m) != {"role", "content"}
                or not isinstance(m["role"], str) or not isinstance(m["content"], str)):
            raise _invalid(rid, f"messages[{i}] must be a map with string keys role and content only")
        if not 1 <= len(m["role"]) <= 32:
            raise _invalid(rid, f"messages[{i}].role must be 1-32 characters (system, user, assistant...)")
        out.append((m["role"], m["content"]))
    return tuple(out)


# ---------------------------------------------------------------------------------- the client's side

def request(id: int, op: str, **fields: Any) -> dict[str, Any]:
    """The request map of any op but generate."""
    return {"v": PROTOCOL_VERSION, "id": id, "op": op, **fields}


def generate_message(id: int, prompt: str | None, *, messages=None, token_ids=None, raw=False,
                     session: str | None = None, stream: bool = True, **params: Any) -> dict[str, Any]:
    """The request map of a generate; None-valued sampling parameters are left out."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": id, "op": "generate", "raw": raw, "stream": stream,
                           "params": {k: (list(v) if k == "stop" else v) for k, v in params.items() if v is not None}}
    if prompt is not None:
        msg["prompt"] = prompt
    if messages is not None:
        msg["messages"] = [dict(m) for m in messages]
    if token_ids is not None:
        msg["token_ids"] = [int(t) for t in token_ids]
    if session is not None:
        msg["session"] = session
    return msg



# ---------------------------------------------------------------------------------- replies

def reply(id: int | None, type: str, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": id, "type": type, **fields}


def error_reply(id: int | None, code: ErrorCode, message: str) -> dict[str, Any]:
    return reply(id, "error", code=code.value, message=message)


def logprobs_wire(logprobs: Any) -> list[dict[str, Any]]:
    """Per-token log-probabilities as sent: {token_id, logprob, top_logprobs: [[id, lp]...]}."""
    return [{"token_id": lp.token_id, "logprob": lp.logprob, "top_logprobs": [list(t) for t in lp.top]}
            for lp in logprobs]


def delta_choice(d: Any) -> dict[str, Any]:
    """One choice of a `delta` reply; `logprobs` only when the request asked for them."""
    out = {"index": d.index, "token_ids": list(d.token_ids), "text": d.text}
    if d.logprobs is not None:
        out["logprobs"] = logprobs_wire(d.logprobs)
    return out


def final_choice(c: Any) -> dict[str, Any]:
    """One choice of a `done` reply; `logprobs` only when the request asked for them."""
    out = {"index": c.index, "text": c.text, "token_ids": list(c.token_ids),
           "finish_reason": c.finish_reason, "cum_logprob": c.cum_logprob}
    if c.logprobs is not None:
        out["logprobs"] = logprobs_wire(c.logprobs)
    return out
