"""What a kvmm client gets back: typed errors (one class per ErrorCode), `Delta`, `Result`,
and the fold of a generate's replies (accepted, delta..., done) into them.

Shared by the sync and trio clients of kvmm_daemon/client.py, which re-exports every name;
import from there. Like the protocol module it imports neither the server nor the engine.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvmm_daemon import protocol as P
from kvmm_daemon.errors import KvmmError


class ClientError(KvmmError):
    """Anything that went wrong talking to the daemon."""


class DaemonUnavailable(ClientError):
    """No daemon listens on the socket (or we may not connect to it)."""


class ConnectionLost(ClientError):
    """The daemon closed the connection before answering."""


class ServerError(ClientError):
    """The daemon answered with an error; `code` is its ErrorCode value."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class BadFrame(ServerError): code = "bad_frame"
class FrameTooLarge(ServerError): code = "frame_too_large"
class UnsupportedVersion(ServerError): code = "unsupported_version"
class UnknownOperation(ServerError): code = "unknown_op"
class InvalidRequest(ServerError): code = "invalid_request"
class NotFound(ServerError): code = "not_found"
class PermissionDenied(ServerError): code = "permission_denied"
class Conflict(ServerError): code = "conflict"
class LimitExceeded(ServerError): code = "limit_exceeded"
class CapacityExceeded(ServerError): code = "capacity"
class ShuttingDown(ServerError): code = "shutting_down"
class EngineFailure(ServerError): code = "engine_error"
class InternalServerError(ServerError): code = "internal"


ERRORS: dict[str, type[ServerError]] = {cls.code: cls for cls in (
    BadFrame, FrameTooLarge, UnsupportedVersion, UnknownOperation, InvalidRequest, NotFound,
    PermissionDenied, Conflict, LimitExceeded, CapacityExceeded, ShuttingDown, EngineFailure,
    InternalServerError)}
assert set(ERRORS) == {c.value for c in P.ErrorCode}


def error_from_reply(msg: dict[str, Any]) -> ServerError:
    code = str(msg.get("code"))
    return ERRORS.get(code, ServerError)(str(msg.get("message", "")), code)


@dataclass(frozen=True, slots=True)
class Delta:
    """New tokens of one choice."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[str, Any]] | None = None   # {token_id, logprob, top_logprobs}, if asked


@dataclass(slots=True)
class Result:
    """The whole answer; `as_dict()` is the `kvmm generate --json` / `kvmm run --json` object."""
    request_id: str
    choices: list[dict[str, Any]]       # index, text, token_ids, finish_reason
    prompt_token_ids: list[int]
    usage: dict[str, int]               # prompt_tokens, cached_prompt_tokens, completion_tokens
    timings: dict[str, float | None]    # ttft_s, prefill_tokens_per_s, decode_tokens_per_s

    @property
    def text(self) -> str:
        return self.choices[0]["text"]

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0]["token_ids"]

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0]["finish_reason"]

    def as_dict(self) -> dict[str, Any]:
        d = {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
             "finish_reason": self.finish_reason, "usage": self.usage, "timings": self.timings}
        if len(self.choices) > 1:
            d["choices"] = self.choices
        return d


@dataclass(slots=True)
class Collector:
    """Folds the replies of one generate into deltas and the final Result."""
    request_id: str | None = None
    result: Result | None = None
    pending: deque = field(default_factory=deque)

    def take(self, msg: dict[str, Any]) -> bool:
        """Consume one reply; True when it was the last one."""
        kind = msg.get("type")
        if kind == "error":
            raise error_from_reply(msg)
        if kind == "accepted":
            self.request_id = msg["request_id"]
        elif kind == "delta":
            for c in msg["choices"]:
                self.pending.append(Delta(msg["request_id"], c["index"], c["token_ids"], c["text"],
                                          c.get("logprobs")))
        elif kind == "done":
            self.result = Result(msg["request_id"], msg["choices"], msg["prompt_token_ids"],
                                 msg["usage"], msg["timings"])
            return True
        else:
            raise BadFrame(f"unexpected reply type {kind!r} to a generate")
        return False


def result_of(msg: dict[str, Any]) -> Any:
    if msg.get("type") == "error":
        raise error_from_reply(msg)
    if msg.get("type") != "result":
        raise BadFrame(f"unexpected reply type {msg.get('type')!r}")
    return msg["result"]
