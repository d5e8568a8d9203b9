"""Weight pools: the model runner's only way to reach weights.

The forward asks for a layer (`layer(i)`), the embedding of its tokens (`embed`), the final
norm and the LM head (`lm_head`), and never keeps weights across steps, so residency is the
pool's to decide. Two pools share that surface:

* `ResidentWeightPool` (no --weight-budget): every segment converted from the model file and
  held in memory, the embedding table too.
* `StreamingWeightPool` (--weight-budget, streaming_weight_pool.py): a hard byte budget over everything the pool holds.
  Weights come from the prepared weight file (weight_file.py) in the forward's exact form
  (the LM head of a Q8_0 table as its blocks, multiplied as they are by the q8_0 mode);
  `WeightPlan` pins the segments that fit beside a window and `StreamWindow` streams the rest
  through iosched, read ahead of compute; the embedding rows a step needs are read from flash.
  The arena is one huge-page buffer, locked in memory (MLOCK_ONFAULT) when the limit allows.

The streaming pool runs the LM head chunk by chunk, the resident one as one matmul; the
logits are the same bits either way (a Q8_0 head's q8_0 kernel computes each logit alone, in
a fixed order), so greedy output does not depend on the budget. Fusion: Q, K and V are one linear, gate and up another.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvmm_daemon.model import quant_linear as ql
from kvmm_daemon.model.spec import ModelSpec
from kvmm_daemon.model.weight_segments import LayerWeights, ModelWeights, segment_nbytes


@dataclass(frozen=True, slots=True)
class WeightPoolStats:
    budget_bytes: int | None
    resident_bytes: int          # bytes the pool holds (for streaming: its whole arena)
    file_bytes: int              # the forward-form bytes of every segment (the model)
    linear_mode: str
    layers: int
    streaming: bool = False
    window: int = 0
    pinned_bytes: int = 0        # segments kept in memory
    streamed_bytes_per_step: int = 0
    locked: bool = False
    lock_error: str | None = None
    steps: int = 0
    bytes_read: int = 0          # weight bytes read from flash, cumulative (embedding rows included)
    stall_s: float = 0.0         # time the forward waited for weights, cumulative
    last_step: dict = field(default_factory=dict)   # bytes_read, stall_s, step_s of the last step
    per_segment: list = field(default_factory=list)  # name, resident, bytes, stall_s (cumulative)


class ResidentWeightPool:
    """Attributes (fixed after construction): spec; layers (LayerWeights in order, in
    memory); output_norm; resident_bytes (what the held tensors occupy)."""

    def __init__(self, model_file, spec: ModelSpec, *, linear_mode: str = "auto") -> None:
        weights = ModelWeights(model_file, spec, linear_mode=linear_mode)
        self.spec = spec
        self.linear_mode = linear_mode
        self.layers: list[LayerWeights] = [weights.layer(i) for i in range(spec.num_layers)]
        self.output_norm = weights.output_norm()
        self._embedding = weights.embedding()
        self._head = weights.lm_head_whole()
        self.file_bytes = sum(segment_nbytes(s) for s in [*self.layers, self._head])
        self.resident_bytes = (self.file_bytes + self.output_norm.numel() * 4
                               + sum(t.numel() * t.element_size() for t in self._embedding.row_parts()))

    def layer(self, i: int) -> LayerWeights:
        return self.layers[i]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._embedding(token_ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(hidden)

    def statistics(self) -> WeightPoolStats:
        return WeightPoolStats(None, self.resident_bytes, self.file_bytes, self.linear_mode,
                               self.spec.num_layers)

    def close(self) -> None:
        pass
