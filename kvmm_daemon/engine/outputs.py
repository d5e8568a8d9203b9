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
class TokenLogprob:
    """A sampled token's log-probability under the model (log_softmax of the logits the
    sampler was given, before temperature/top-k/top-p) and the `top` best tokens of that
    step as (token id, log-prob), best first."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None    # one per token_ids entry, when asked for


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
    logprobs: list[TokenLogprob] | None = None    # one per token_ids entry, when asked for


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


class OutputAccumulator:
    """Folds one request's `RequestOutput`s into whole choices: the one place that turns a
    stream of deltas into text, token ids and finish reasons (Engine.generate, the msgpack
    server and the HTTP server all use it).

    Attributes:
      texts[i] / token_ids[i]: everything choice i produced so far, in order; exactly
        `num_choices` entries each.
      logprobs[i]: the TokenLogprob of every token of choice i, or None if the request did
        not ask for them (then no delta carries any).
      finish_reasons[i]: None while choice i runs; set from the latest output.
      last: the latest output taken (its usage and timings are the request's so far), None
        before the first.
    """

    __slots__ = ("texts", "token_ids", "logprobs", "finish_reasons", "last")

    def __init__(self, num_choices: int):
        assert num_choices >= 1
        self.texts: list[list[str]] = [[] for _ in range(num_choices)]
        self.token_ids: list[list[int]] = [[] for _ in range(num_choices)]
        self.logprobs: list[list[TokenLogprob] | None] = [None] * num_choices
        self.finish_reasons: list[str | None] = [None] * num_choices
        self.last: RequestOutput | None = None

    def take(self, out: RequestOutput) -> None:
        for d in out.deltas:
            self.texts[d.index].append(d.text)
            self.token_ids[d.index].extend(d.token_ids)
            if d.logprobs is not None:
                self.logprobs[d.index] = (self.logprobs[d.index] or []) + d.logprobs
        if out.finish_reasons:
            self.finish_reasons = list(out.finish_reasons)
        self.last = out

    def abort(self) -> None:
        """Mark every unfinished choice as aborted (the request was cancelled)."""
        self.finish_reasons = [r or "abort" for r in self.finish_reasons]

    def choices(self) -> list[Choice]:
        return [Choice(i, "".join(t), ids, r, logprobs=lp) for i, (t, ids, r, lp)
                in enumerate(zip(self.texts, self.token_ids, self.finish_reasons, self.logprobs))]

    def usage(self, prompt_tokens: int) -> Usage:
        if self.last is not None:
            return self.last.usage
        return Usage(prompt_tokens, 0, sum(map(len, self.token_ids)))

    def timings(self) -> Timings:
        return self.last.timings if self.last is not None else Timings(None, None, None)
