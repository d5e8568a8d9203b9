"""Token sampling for one step: greedy, temperature, top-k, top-p, seeded per choice.

Each sequence owns a torch.Generator seeded from its request's seed (plus the choice index
for n > 1), so the same seed and prompt give the same text whatever else is in the batch.
Greedy rows take the argmax with no randomness. Beam search does not sample: it ranks
log-probabilities (see beam_search.py).
"""
from __future__ import annotations

import torch

from kvmm_daemon.engine.outputs import TokenLogprob
from kvmm_daemon.engine.sampling_params import SamplingParams


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits of one row [V] with top-k / top-p masked to -inf."""
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        scaled = scaled.index_fill(0, order[drop], float("-inf"))
    return scaled


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [N, V]; row i uses params[i] and generators[i]."""
    assert logits.shape[0] == len(params) == len(generators)
    out = logits.argmax(dim=-1).tolist()
    for i, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature == 0.0:
            continue
        assert gen is not None, "a sampled row needs its generator"
        probs = torch.softmax(filter_logits(logits[i], p), dim=-1)
        out[i] = int(torch.multinomial(probs, 1, generator=gen))
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Row i's log-probability of tokens[i] and its k best tokens, from the logits [N, V] the
    sampler was given (log_softmax in float32; temperature and top-k/top-p do not apply)."""
    assert logits.shape[0] == len(tokens) and 0 <= k
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    top_v, top_i = (torch.topk(logp, k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    return [TokenLogprob(t, lp, tuple(zip(ids, vals)))
            for t, lp, ids, vals in zip(tokens, chosen, top_i.tolist(), top_v.tolist())]
