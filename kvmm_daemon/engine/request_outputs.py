"""Building what a step reports for a request: streamable deltas, usage and timings.

Usage counts prompt tokens, the prompt tokens whose KV was reused (prefix cache, session or
flash) and completion tokens over every choice. Timings: time to first token from arrival,
prefill speed over the tokens actually computed, decode speed after the first token.
"""
from __future__ import annotations

from kvmm_daemon.engine.outputs import ChoiceDelta, RequestOutput, Timings, Usage
from kvmm_daemon.engine.sequence import Request
from kvmm_daemon.engine.stop_checker import StopChecker


def usage(req: Request) -> Usage:
    completion = sum(len(s.output_token_ids) for s in req.all_seqs())
    return Usage(req.num_prompt_tokens, max(0, req.num_cached_prompt_tokens), completion)


def timings(req: Request) -> Timings:
    ttft = None if req.first_token_time is None else req.first_token_time - req.arrival_time
    computed = req.num_prompt_tokens - max(0, req.num_cached_prompt_tokens)
    prefill = computed / ttft if ttft else None
    decode = None
    if req.first_token_time is not None and req.finish_time is not None:
        seqs = req.all_seqs()
        after_first = sum(len(s.output_token_ids) for s in seqs) - len(seqs)
        span = req.finish_time - req.first_token_time
        if after_first > 0 and span > 0:
            decode = after_first / span
    return Timings(ttft, prefill, decode)


def request_output(req: Request) -> RequestOutput:
    """The request's news since the last report (consumes the streamed deltas)."""
    deltas, reasons = [], []
    if req.params.beam_width > 1:
        # beams are re-ranked every step: stream nothing until the final choices exist
        live = req.finished if req.is_finished else []
    else:
        live = sorted(req.all_seqs(), key=lambda s: s.choice_index)
    want_logprobs = req.params.logprobs is not None
    for seq in live:
        start = seq.emitted_tokens
        toks, text = StopChecker.take_delta(seq, req.params)
        lps = seq.logprobs[start:start + len(toks)] if want_logprobs else None
        deltas.append(ChoiceDelta(seq.choice_index, toks, text, lps))
        reasons.append(seq.finish_reason)
    return RequestOutput(req.request_id, deltas, req.is_finished, reasons, usage(req), timings(req), req.error)


def error_output(request_id: str, prompt_len: int, error: str) -> RequestOutput:
    """The final report of a request refused inside the engine."""
    return RequestOutput(request_id, [], True, [], Usage(prompt_len, 0, 0), Timings(None, None, None), error)
