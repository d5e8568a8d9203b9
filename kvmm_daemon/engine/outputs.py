"""What the engine reports to its callers: per-step deltas and final results."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int       # prompt tokens whose KV was reused, not recomputed
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    ttft_s: float | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    token_ids: list[int]
    text: str


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    deltas: list[ChoiceDelta]
    finished: bool
    finish_reasons: list[str | None]
    usage: Usage
    timings: Timings
    error: str | None = None


@dataclass(slots=True)
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cum_logprob: float | None = None


@dataclass(slots=True)
class GenerateResult:
    """The whole answer of one request (kvmm run / generate --json)."""

    request_id: str
    prompt_token_ids: list[int]
    choices: list[Choice]
    usage: Usage
    timings: Timings
    error: str | None = None

    def as_dict(self) -> dict:
        first = self.choices[0]
        d = {
            "text": first.text,
            "token_ids": first.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "finish_reason": first.finish_reason,
            "usage": asdict(self.usage),
            "timings": asdict(self.timings),
        }
        if len(self.choices) > 1:
            d["choices"] = [asdict(c) for c in self.choices]
        return d
