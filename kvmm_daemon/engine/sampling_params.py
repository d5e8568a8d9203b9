"""SamplingParams: how one request wants its tokens chosen; validated at the edge."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from kvmm_daemon.errors import RequestError

MAX_N = 16
MAX_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    seed: int | None = None         # same seed and prompt -> same text
    n: int = 1                      # parallel samples sharing the prompt's KV
    beam_width: int = 1             # >1 = beam search (deterministic)
    stop: tuple[str, ...] = ()      # stop strings (not included in the output)
    ignore_eos: bool = False
    logprobs: int | None = None     # report each token's log-prob and this many top alternatives

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, want: str) -> RequestError:
            return RequestError(f"sampling parameter {name}={value!r} is invalid; {want}")

        for name in ("max_tokens", "top_k", "n", "beam_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, value, "give an integer")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, value, "give a number")
            setattr(self, name, float(value))
        if self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "give at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", self.temperature, "use 0 (greedy) up to 100")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "use a value in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", self.top_k, "use 0 (off) or a positive count")
        if not 1 <= self.n <= MAX_N:
            raise bad("n", self.n, f"use 1..{MAX_N}")
        if not 1 <= self.beam_width <= MAX_N:
            raise bad("beam_width", self.beam_width, f"use 1..{MAX_N}")
        if self.n > 1 and self.beam_width > 1:
            raise bad("n", self.n, "combine n > 1 with beam_width 1 only (beams return beam_width choices)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", self.seed, "give an integer")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", self.stop, "give a list of non-empty strings")
        self.stop = tuple(self.stop)
        if self.logprobs is not None:
            if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int):
                raise bad("logprobs", self.logprobs, "give an integer (alternatives per token) or leave it out")
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise bad("logprobs", self.logprobs, f"use 0..{MAX_LOGPROBS} alternatives per token")
            if self.beam_width > 1:
                raise bad("logprobs", self.logprobs, "per-token log-probabilities are not reported for "
                                                     "beam search; use beam_width 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and self.beam_width == 1

    @property
    def num_choices(self) -> int:
        return max(self.n, self.beam_width)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Build from wire/JSON input; unknown keys are an error naming them."""
        if not isinstance(d, dict):
            raise RequestError(f"sampling parameters must be a mapping, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RequestError(f"unknown sampling parameter(s) {', '.join(map(str, unknown))}; "
                               f"known: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except TypeError as exc:  # pragma: no cover - guarded by the key check
            raise RequestError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d
