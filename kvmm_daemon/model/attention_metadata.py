"""What one forward step needs to know about where its tokens' KV lives.

Built by the model runner from the scheduler's output; consumed by every attention layer.
A step is a *decode* step when every sequence contributes exactly one query token; then the
decode kernel runs. Otherwise (prefill chunks, or prefill mixed with decodes) the varlen
prefill kernel serves all sequences, a decode being a prefill of one query.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Invariants: len(slot_mapping) == total query tokens == query_start_loc[-1];
    block_tables has one row per sequence, -1 padded; seq_lens[s] >= query_len[s]."""

    slot_mapping: torch.Tensor      # int64 [T]; -1 = do not store
    block_tables: torch.Tensor      # int32 [S, max_blocks]
    seq_lens: torch.Tensor          # int32 [S] context incl. this step's tokens
    query_start_loc: torch.Tensor   # int32 [S + 1]
    is_decode: bool                 # every sequence has exactly one query token

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
