"""Finishing and streaming rules for one sequence after a token is appended.

A sequence finishes on an end-of-sequence token (unless ignore_eos), when a stop string
appears in its text (the text is cut before it), at max_tokens, or at max_model_len.
Streaming holds back what might still change: the tail that could be the start of a stop
string, and a trailing incomplete UTF-8 character (decoded as U+FFFD).
"""
from __future__ import annotations

from kvmm_daemon.engine.sampling_params import SamplingParams
from kvmm_daemon.engine.sequence import Sequence


class StopChecker:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(tokenizer.eos_token_ids)
        self.max_model_len = max_model_len

    def update(self, seq: Sequence, params: SamplingParams) -> None:
        """Refresh seq.text with its newest token and set seq.finish_reason if it ended."""
        last = seq.token_ids[-1]
        hit_eos = last in self.eos_ids and not params.ignore_eos
        out_ids = seq.output_token_ids[:-1] if hit_eos else seq.output_token_ids
        text = self.tokenizer.decode(out_ids)
        if params.stop:
            search_from = max(0, len(seq.text) - max(len(s) for s in params.stop))
            cut = min((i for s in params.stop if (i := text.find(s, search_from)) >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                seq.finish_reason = "stop"
                return
        seq.text = text
        if hit_eos:
            seq.finish_reason = "stop"
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    @staticmethod
    def take_delta(seq: Sequence, params: SamplingParams) -> tuple[list[int], str]:
        """The tokens and text not yet streamed that are safe to stream now."""
        n_out = len(seq.output_token_ids)
        tokens = seq.output_token_ids[seq.emitted_tokens:n_out]
        seq.emitted_tokens = n_out
        end = len(seq.text)
        if seq.finish_reason is None:
            if params.stop:
                end -= max(len(s) for s in params.stop) - 1
            while end > seq.emitted_chars and seq.text[end - 1] == "\ufffd":
                end -= 1
        if end <= seq.emitted_chars:
            return tokens, ""
        text = seq.text[seq.emitted_chars:end]
        seq.emitted_chars = end
        return tokens, text
