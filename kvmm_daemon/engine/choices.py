"""Turning logits into a request's next tokens: plain sampling, n-way parallel sampling and
beam search, the latter two sharing the prompt's KV blocks copy-on-write.

When a request's prompt has just been computed it has one sequence; `expand` forks it into
n samples or beam_width beams (KV manager `fork`: every block shared, the shared partial last
block copied when first written). Beam search then keeps the beam_width best partial
hypotheses by cumulative log-probability at each step, forking a beam that is continued twice
and freeing beams that are dropped; hypotheses ending in EOS move to `request.finished`.
Ranking uses score = cum_logprob / output_len (length penalty 1, as in vLLM/HF).
"""
from __future__ import annotations

import torch

from kvmm_daemon.engine.sampler import make_generator, sample_rows, token_logprobs
from kvmm_daemon.engine.sequence import Request, Sequence, next_seq_id
from kvmm_daemon.kv.kv_manager import KVCacheManager


def beam_score(seq: Sequence) -> float:
    return seq.cum_logprob / max(1, len(seq.output_token_ids))


def _fork(kv: KVCacheManager, parent: Sequence, index: int) -> Sequence:
    child = Sequence(seq_id=next_seq_id(), token_ids=list(parent.token_ids),
                     num_prompt_tokens=parent.num_prompt_tokens, choice_index=index,
                     num_computed_tokens=parent.num_computed_tokens, cum_logprob=parent.cum_logprob,
                     text=parent.text, emitted_chars=parent.emitted_chars,
                     emitted_tokens=parent.emitted_tokens, logprobs=list(parent.logprobs))
    kv.fork(parent.seq_id, child.seq_id)
    return child


def expand(req: Request, logits: torch.Tensor, kv: KVCacheManager, base_seed: int) -> list[Sequence]:
    """First tokens after the prompt; returns the sequences that got a new token."""
    assert len(req.seqs) == 1 and not req.forked
    root = req.seqs[0]
    req.forked = True
    p = req.params
    if p.beam_width > 1:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, p.beam_width)
        seqs = [root] + [_fork(kv, root, i) for i in range(1, p.beam_width)]
        for seq, lp, tok in zip(seqs, top.values.tolist(), top.indices.tolist()):
            seq.token_ids.append(tok)
            seq.cum_logprob += lp
        req.seqs = seqs
        return seqs
    seqs = [root] + [_fork(kv, root, i) for i in range(1, p.n)]
    for i, seq in enumerate(seqs):
        if p.temperature > 0:
            seq.generator = make_generator(base_seed + i)
    rows = logits.expand(len(seqs), -1)
    _append(seqs, sample_rows(rows, [p] * len(seqs), [s.generator for s in seqs]), rows, p.logprobs)
    req.seqs = seqs
    return seqs


def _append(seqs: list[Sequence], toks: list[int], logits: torch.Tensor, logprobs: int | None) -> None:
    """Give seqs[i] its sampled token toks[i] (and its TokenLogprob when the request asked)."""
    lps = token_logprobs(logits, toks, logprobs) if logprobs is not None else None
    for i, (seq, tok) in enumerate(zip(seqs, toks)):
        seq.token_ids.append(tok)
        if lps is not None:
            seq.logprobs.append(lps[i])


def beam_step(req: Request, logits: torch.Tensor, kv: KVCacheManager, eos_ids: frozenset[int]) -> list[Sequence]:
    """One beam-search step over the live beams (logits row i belongs to req.seqs[i]).
    Returns the live beams, each with one new token; dropped beams' blocks are freed and
    finished hypotheses are moved to req.finished."""
    width = req.params.beam_width
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, 2 * width, dim=-1)
    cands = []
    for b, seq in enumerate(req.seqs):
        for lp, tok in zip(top.values[b].tolist(), top.indices[b].tolist()):
            cands.append((seq.cum_logprob + lp, b, tok))
    cands.sort(key=lambda c: -c[0])
    chosen: list[tuple[float, int, int]] = []
    for cum, b, tok in cands:
        if tok in eos_ids and not req.params.ignore_eos:
            if len(req.finished) < width:
                req.finished.append(_finished_copy(req.seqs[b], tok, cum))
            continue
        chosen.append((cum, b, tok))
        if len(chosen) == width:
            break
    used: set[int] = set()
    new_seqs: list[Sequence] = []
    # forks first (they copy the parent's tokens before the parent appends its own)
    plan = []
    for cum, b, tok in chosen:
        parent = req.seqs[b]
        if b in used:
            plan.append((_fork(kv, parent, len(plan)), cum, tok))
        else:
            used.add(b)
            plan.append((parent, cum, tok))
    for b, seq in enumerate(req.seqs):
        if b not in used:
            kv.free(seq.seq_id)
    for i, (seq, cum, tok) in enumerate(plan):
        seq.token_ids.append(tok)
        seq.cum_logprob = cum
        seq.choice_index = i
        new_seqs.append(seq)
    req.seqs = new_seqs
    return new_seqs


def _finished_copy(seq: Sequence, tok: int, cum: float) -> Sequence:
    """A finished hypothesis: the beam plus its EOS token, holding no KV."""
    done = Sequence(seq_id=-1, token_ids=seq.token_ids + [tok], num_prompt_tokens=seq.num_prompt_tokens,
                    cum_logprob=cum, emitted_tokens=0)
    done.finish_reason = "stop"
    return done


def beams_done(req: Request) -> bool:
    """Early stopping: width finished hypotheses and none of the live beams can beat the
    worst of them (scores only fall as log-probs are added, up to the length normalisation)."""
    width = req.params.beam_width
    if not req.seqs:
        return True
    if len(req.finished) < width:
        return False
    worst = min(beam_score(s) for s in req.finished)
    return all(s.cum_logprob / max(1, req.params.max_tokens) < worst for s in req.seqs)


def sample_step(req: Request, logits: torch.Tensor) -> list[Sequence]:
    """Plain sampling step: one token for each live sequence."""
    toks = sample_rows(logits, [req.params] * len(req.seqs), [s.generator for s in req.seqs])
    _append(req.seqs, toks, logits, req.params.logprobs)
    return list(req.seqs)
