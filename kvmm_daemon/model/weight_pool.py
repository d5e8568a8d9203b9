"""WeightPool: the model runner's only way to reach weights, under a byte budget.

Weights are addressed by layer (`layer(i)`) and by role (`embed`, `lm_head`, `output_norm`),
never by holding tensors across steps, so the pool decides residency. Today every weight is
made resident at start (quantized where the linear kind allows, see quant_linear.py) and the
budget is checked against the resident bytes: a budget below the model's resident size is
refused with the figure needed. Streaming layers from flash through iosched plugs in here:
`layer(i)` would wait for layer i's chunks and prefetch i+1..i+k.

Fusion: Q, K and V become one linear (one matmul per layer), gate and up another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvmm_daemon.errors import ConfigError
from kvmm_daemon.model.spec import ModelSpec
from kvmm_daemon.sizes import format_size

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    ffn_norm: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass(frozen=True, slots=True)
class WeightPoolStats:
    budget_bytes: int | None
    resident_bytes: int
    file_bytes: int
    linear_mode: str
    layers: int


class WeightPool:
    """Attributes:
        layers: LayerWeights per layer index; all resident (invariant: resident_bytes is the
            sum of the bytes every held tensor/packed weight occupies, <= budget_bytes).
    """

    def __init__(self, model_file, spec: ModelSpec, *, budget_bytes: int | None = None,
                 linear_mode: str = "auto") -> None:
        from kvmm_daemon.model import quant_linear as ql

        self.spec = spec
        self.budget_bytes = budget_bytes
        self.linear_mode = linear_mode
        self._file_bytes = 0

        def tensor(name: str):
            t = model_file.tensor(name)
            self._file_bytes += t.nbytes
            return t

        def norm(name: str) -> torch.Tensor:
            return tensor(name).dequantize().to(torch.float32).contiguous()

        def linear(*names: str) -> Linear:
            return ql.make_linear([tensor(n) for n in names], mode=linear_mode)

        self.layers: list[LayerWeights] = []
        for i in range(spec.num_layers):
            p = f"blk.{i}."
            self.layers.append(LayerWeights(
                attn_norm=norm(p + "attn_norm.weight"),
                qkv=linear(p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"),
                o=linear(p + "attn_output.weight"),
                ffn_norm=norm(p + "ffn_norm.weight"),
                gate_up=linear(p + "ffn_gate.weight", p + "ffn_up.weight"),
                down=linear(p + "ffn_down.weight"),
            ))
        self.output_norm = norm("output_norm.weight")
        embd = tensor("token_embd.weight")
        self._embedding = ql.make_embedding(embd)
        if spec.tie_word_embeddings or "output.weight" not in model_file.tensor_names():
            self._lm_head = ql.make_lm_head(embd, mode=linear_mode)
        else:
            self._lm_head = ql.make_lm_head(tensor("output.weight"), mode=linear_mode)
        self.resident_bytes = self._count_resident_bytes()
        if budget_bytes is not None and self.resident_bytes > budget_bytes:
            raise ConfigError(
                f"weight budget of {format_size(budget_bytes)} is below the model's resident size of "
                f"{format_size(self.resident_bytes)}; raise --weight-budget to at least that")

    def _count_resident_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for obj in [self.output_norm, self._embedding, self._lm_head, *self.layers]:
            for t in _tensors_of(obj):
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total

    def layer(self, i: int) -> LayerWeights:
        return self.layers[i]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._embedding(token_ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(hidden)

    def statistics(self) -> WeightPoolStats:
        return WeightPoolStats(self.budget_bytes, self.resident_bytes, self._file_bytes,
                               self.linear_mode, len(self.layers))


def _tensors_of(obj) -> list[torch.Tensor]:
    """Every tensor an object holds (directly, in slots/dicts, or in LayerWeights)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, LayerWeights):
        return [t for f in LayerWeights.__slots__ for t in _tensors_of(getattr(obj, f))]
    found = []
    attrs = getattr(obj, "__dict__", {}).values()
    slots = [getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s)]
    for value in list(attrs) + slots:
        if isinstance(value, torch.Tensor):
            found.append(value)
    return found
