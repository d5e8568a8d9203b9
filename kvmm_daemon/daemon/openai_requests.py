"""OpenAI request bodies -> CompletionRequest, and OpenAI-shaped errors.

`parse_completion` validates the JSON body of POST /v1/chat/completions or /v1/completions
field by field; anything it cannot honour is an `ApiError` (HTTP 400) that names the field,
never a silent fallback. Accepted, as the OpenAI API defines them: model, messages / prompt,
stream, stream_options.include_usage, n, temperature, top_p, max_tokens,
max_completion_tokens, stop, seed, user, logprobs (chat: true/false with top_logprobs
0..20; completions: 0..20 alternatives), and echo/best_of/penalties only at their "off" values. kvmm extensions (vLLM spells the first two the same way):
`top_k`, `ignore_eos`, and `kvmm_session` — the name of a session of the caller's uid that
holds the conversation's KV between requests (created on first use; root may name another
uid's as "UID:NAME"); with it, send only the new turn, the session holds the earlier ones.

Left out on purpose: tools/function calling, response_format other than
text, batched prompts (one prompt per request), echo, best_of, suffix, logit_bias.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from kvmm_daemon import protocol as P
from kvmm_daemon.engine.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams
from kvmm_daemon.errors import RequestError

MAX_STOP = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# HTTP status and OpenAI error type of each daemon error code
STATUS = {
    P.ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    P.ErrorCode.BAD_FRAME: (400, "invalid_request_error"),
    P.ErrorCode.CAPACITY: (400, "invalid_request_error"),
    P.ErrorCode.FRAME_TOO_LARGE: (413, "invalid_request_error"),
    P.ErrorCode.NOT_FOUND: (404, "not_found_error"),
    P.ErrorCode.PERMISSION_DENIED: (403, "permission_error"),
    P.ErrorCode.CONFLICT: (409, "conflict_error"),
    P.ErrorCode.LIMIT_EXCEEDED: (429, "rate_limit_error"),
    P.ErrorCode.SHUTTING_DOWN: (503, "service_unavailable_error"),
    P.ErrorCode.ENGINE_ERROR: (500, "server_error"),
    P.ErrorCode.INTERNAL: (500, "server_error"),
    P.ErrorCode.UNSUPPORTED_VERSION: (400, "invalid_request_error"),
    P.ErrorCode.UNKNOWN_OP: (404, "not_found_error"),
}
assert set(STATUS) == set(P.ErrorCode)


class ApiError(Exception):
    """An error reply: HTTP `status` and OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @classmethod
    def from_protocol(cls, exc: P.ProtocolError, param: str | None = None) -> ApiError:
        status, type_ = STATUS[exc.code]
        return cls(status, exc.message, type=type_, param=param, code=exc.code.value)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    chat: bool
    model: str
    prompt: str | None                         # /v1/completions text (fed raw, no template)
    token_ids: tuple[int, ...] | None          # /v1/completions token ids
    messages: list[dict[str, str]] | None      # /v1/chat/completions
    params: SamplingParams
    stream: bool
    include_usage: bool
    session: str | None
    user: str | None


COMMON = {"model", "stream", "stream_options", "n", "temperature", "top_p", "max_tokens", "stop",
          "seed", "logprobs", "user", "presence_penalty", "frequency_penalty", "logit_bias",
          "top_k", "ignore_eos", "kvmm_session"}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
             "tool_choice", "parallel_tool_calls", "functions", "function_call"}
COMPLETION_ONLY = {"prompt", "echo", "best_of", "suffix"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _int(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v) or not lo <= v <= hi:
        raise bad(key, f"{key} must be an integer from {lo} to {hi}, not {v!r}")
    return v


def _num(body: dict, key: str, lo: float, hi: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_num(v) or not lo <= v <= hi:
        raise bad(key, f"{key} must be a number from {lo} to {hi}, not {v!r}")
    return float(v)


def _bool(body: dict, key: str) -> bool | None:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise bad(key, f"{key} must be true or false, not {v!r}")
    return v


def _off(body: dict, key: str, off: tuple, why: str) -> None:
    """`key` may only be absent or one of its `off` values."""
    if key in body and not any(body[key] == o and type(body[key]) is type(o) for o in off):
        raise ApiError(400, f"{key}={body[key]!r} is not supported by kvmm: {why}", param=key,
                       code="unsupported_parameter")


def parse_completion(body: Any, *, chat: bool) -> CompletionRequest:
    """The request of a chat (chat=True) or text completion body; ApiError naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    allowed = COMMON | (CHAT_ONLY if chat else COMPLETION_ONLY)
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"unrecognized request argument supplied: {key}", param=str(key),
                           code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: a model id from GET /v1/models")
    if chat:
        _off(body, "tools", ([], None), "tools and function calling are not implemented")
        _off(body, "functions", ([], None), "tools and function calling are not implemented")
        _off(body, "tool_choice", ("none", None), "tools and function calling are not implemented")
        _off(body, "function_call", ("none", None), "tools and function calling are not implemented")
        _off(body, "parallel_tool_calls", (False, True, None), "")
        rf = body.get("response_format")
        if rf is not None and rf != {"type": "text"}:
            raise ApiError(400, "response_format other than {\"type\": \"text\"} is not supported by kvmm",
                           param="response_format", code="unsupported_parameter")
    else:
        _off(body, "echo", (False, None), "the prompt is not echoed")
        _off(body, "best_of", (1, None), "use n for several samples")
        _off(body, "suffix", (None, ""), "insertion (suffix) is not implemented")
    for key in ("presence_penalty", "frequency_penalty"):
        _off(body, key, (0, 0.0, None), "repetition penalties are not implemented")
    _off(body, "logit_bias", ({}, None), "logit_bias is not implemented")

    stream = bool(_bool(body, "stream"))
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options", "stream_options must be an object like {\"include_usage\": true}")
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        include_usage = bool(_bool(so, "include_usage"))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"user must be a string, not {type(user).__name__}")
    session = body.get("kvmm_session")
    if session is not None and (not isinstance(session, str) or not P.SESSION_REF_RE.match(session)):
        raise bad("kvmm_session", f"kvmm_session {session!r} is not a session name; use 1-64 of "
                                  f"A-Z a-z 0-9 . _ - (root may prefix another uid as UID:NAME)")
    params = _params(body, chat)
    prompt = token_ids = messages = None
    if chat:
        messages = _messages(body.get("messages"))
    else:
        prompt, token_ids = _prompt(body.get("prompt"))
    return CompletionRequest(chat, model, prompt, token_ids, messages, params, stream, include_usage,
                             session, user)


def _params(body: dict, chat: bool) -> SamplingParams:
    max_tokens = _int(body, "max_tokens", 1, 1 << 20)
    if chat:
        max_tokens = _int(body, "max_completion_tokens", 1, 1 << 20) or max_tokens
    d: dict[str, Any] = {}
    if max_tokens is not None:
        d["max_tokens"] = max_tokens
    for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        v = _num(body, key, lo, hi)
        if v is not None:
            d[key] = v
    if d.get("top_p") == 0.0:
        raise bad("top_p", "top_p must be above 0 (1 keeps every token)")
    for key, lo, hi in (("n", 1, MAX_N), ("top_k", -1, 1 << 20), ("seed", -(1 << 63), (1 << 64) - 1)):
        v = _int(body, key, lo, hi)
        if v is not None:
            d[key] = max(v, 0) if key == "top_k" else v          # vLLM: top_k -1 = off
    logprobs = _logprobs(body, chat)
    if logprobs is not None:
        d["logprobs"] = logprobs
    ignore_eos = _bool(body, "ignore_eos")
    if ignore_eos is not None:
        d["ignore_eos"] = ignore_eos
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stops, list) or len(stops) > MAX_STOP
                or not all(isinstance(s, str) and s for s in stops)):
            raise bad("stop", f"stop must be a non-empty string or a list of up to {MAX_STOP} of them")
        d["stop"] = tuple(stops)
    try:
        return SamplingParams.from_dict(d)
    except RequestError as exc:
        m = re.search(r"parameter (\w+)=", str(exc))
        raise bad(m.group(1) if m else "params", str(exc)) from None


def _logprobs(body: dict, chat: bool) -> int | None:
    """Alternatives per token to report, None for no log-probabilities. Chat: `logprobs`
    true/false and `top_logprobs` (needs logprobs true); completions: `logprobs` is the count."""
    if not chat:
        return _int(body, "logprobs", 0, MAX_LOGPROBS)
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if not _bool(body, "logprobs"):
        if top:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        return None
    return top or 0


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad(where, f"{where} has unsupported key(s) {', '.join(sorted(map(str, extra)))} "
                             f"(tool calls are not implemented)")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if (not isinstance(part, dict) or part.get("type") != "text"
                    or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}):
                raise bad(f"{where}[{j}]", f"{where}[{j}] must be {{\"type\": \"text\", \"text\": ...}}; "
                                           f"images and audio are not supported by this model")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(where, f"{where} must be a string or a list of text parts")


def _prompt(value: Any) -> tuple[str | None, tuple[int, ...] | None]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]                                     # a batch of one
    if isinstance(value, str):
        if not value:
            raise bad("prompt", "prompt is empty; give at least one character")
        return value, None
    if (isinstance(value, list) and value
            and all(_is_int(t) and 0 <= t <= P.MAX_TOKEN_ID for t in value)):
        return None, tuple(value)
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise bad("prompt", "batched prompts are not supported; send one request per prompt")
    raise bad("prompt", "prompt must be a non-empty string or a list of token ids")
