"""Teacher-forced scoring (what llama.cpp users know as llama-perplexity).

The sequence is computed through the same paged path as generation (its KV lives in pool
blocks, in chunks of the step token budget); at every position the top-1 next token and the
log-probability of the actual next token are recorded; perplexity = exp(-mean log p).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvmm_daemon.engine.model_runner import ScheduledChunk
from kvmm_daemon.engine.sequence import next_seq_id
from kvmm_daemon.errors import CapacityError, RequestError
from kvmm_daemon.kv.tenant import tenant_root


@dataclass(frozen=True, slots=True)
class ScoreResult:
    token_ids: list[int]
    top1_next: list[int]              # argmax after position i (len n - 1)
    logprob_of_next: list[float]      # log p(token i+1 | tokens ..i)
    top1_top2_margin: list[float]
    perplexity: float

    def as_dict(self) -> dict:
        return {"token_ids": self.token_ids, "top1_next": self.top1_next,
                "logprob_of_next": self.logprob_of_next, "top1_top2_margin": self.top1_top2_margin,
                "perplexity": self.perplexity}


def score(engine, token_ids: list[int]) -> ScoreResult:
    """Score token_ids (>= 2 tokens) on an idle engine."""
    n = len(token_ids)
    if n < 2:
        raise RequestError("scoring needs at least 2 tokens")
    if n > engine.cfg.max_model_len:
        raise RequestError(f"{n} tokens exceed max_model_len {engine.cfg.max_model_len}; "
                           "shorten the text or raise --max-model-len")
    kv, runner = engine.kv, engine.runner
    seq_id = next_seq_id()
    if kv.allocate(seq_id, token_ids, tenant_root(None)) is None:
        raise CapacityError(f"the KV pool cannot hold {n} tokens now; raise --kv-budget")
    try:
        # every position is recomputed, prefix-cache hits included: logits are needed everywhere
        chunk = engine.cfg.max_num_batched_tokens
        logits = []
        for start in range(0, n - 1, chunk):
            count = min(chunk, n - 1 - start)
            c = ScheduledChunk(token_ids, start, count, kv.block_table(seq_id), True)
            logits.append(runner.execute([c], kv.take_pending_copies(), all_logits=True))
        logp = torch.log_softmax(torch.cat(logits), dim=-1)
    finally:
        kv.free(seq_id)
    nxt = torch.tensor(token_ids[1:])
    lp = logp.gather(1, nxt[:, None])[:, 0]
    top2 = torch.topk(logp, 2, dim=-1)
    return ScoreResult(list(token_ids), top2.indices[:, 0].tolist(), [round(x, 5) for x in lp.tolist()],
                       (top2.values[:, 0] - top2.values[:, 1]).tolist(),
                       math.exp(-float(lp.mean())))
