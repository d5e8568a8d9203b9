"""Sequences and requests: the scheduler's units.

A `Request` is what a client asked for: one prompt, its sampling parameters, and the
sequences that grow from it. Until its prompt has been computed a request has exactly one
sequence; then parallel sampling forks it into n sequences and beam search into beam_width
beams, all sharing the prompt's KV blocks copy-on-write (the KV manager's fork).
A sequence is identified in the KV manager by its integer `seq_id`.
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from kvmm_daemon.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


def next_seq_id() -> int:
    return next(_seq_ids)


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # not holding KV blocks (new, or preempted for recompute)
    RUNNING = "running"      # every live sequence holds its blocks
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    """Invariants: num_computed_tokens <= len(token_ids); token_ids[:num_prompt_tokens] is
    the request's prompt; output tokens are token_ids[num_prompt_tokens:]."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    choice_index: int = 0
    num_computed_tokens: int = 0
    cum_logprob: float = 0.0
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    text: str = ""               # detokenized output so far (stop strings cut it)
    emitted_chars: int = 0       # how much of `text` has been streamed
    emitted_tokens: int = 0      # how many output tokens have been streamed
    logprobs: list = field(default_factory=list)   # TokenLogprob per output token, if asked for

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


@dataclass(slots=True)
class Request:
    """Invariants: status RUNNING iff every sequence in `seqs` holds KV blocks; `seqs` are
    the live sequences, `finished` the ones that ended (beam search keeps its candidates
    there); forked is True once the prompt has been computed and choices were expanded."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    session_id: str | None = None
    owner: object = None
    status: RequestStatus = RequestStatus.WAITING
    finished: list[Sequence] = field(default_factory=list)
    forked: bool = False
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    prefill_done_time: float | None = None
    finish_time: float | None = None
    num_cached_prompt_tokens: int = -1   # set when the prompt's KV is first allocated
    num_preemptions: int = 0
    error: str | None = None
    cache_root: bytes | None = None      # where its prefix-hash chain starts (kv/tenant.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def all_seqs(self) -> list[Sequence]:
        return self.seqs + self.finished
