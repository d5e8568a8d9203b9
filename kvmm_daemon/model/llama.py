"""Llama-family forward pass over the paged KV cache.

RMSNorm -> fused QKV -> RoPE (adjacent pairs, see rope.py) -> write K/V into their slots ->
paged attention through the block tables -> output projection; RMSNorm -> fused gate/up ->
SwiGLU -> down. Weights come from the WeightPool one layer at a time, so the pool may stream
them from flash; the model never keeps its own references between steps.

The forward runs on flattened tokens of all sequences of a step ([T, hidden]), like vLLM;
`AttentionMetadata` says which tokens belong to which sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import paged_attention_decode, paged_attention_prefill, reshape_and_cache
from kvmm_daemon.kv.kv_cache import KVCache
from kvmm_daemon.model.attention_metadata import AttentionMetadata
from kvmm_daemon.model.rope import RotaryEmbedding
from kvmm_daemon.model.spec import ModelSpec


class LlamaModel:
    """Attributes:
        spec: the model's shape; weights: the weight pool every weight is fetched from
            (weight_pool.py: resident or streaming);
        rope: cos/sin tables covering spec.context_length positions.
    """

    def __init__(self, spec: ModelSpec, weights, max_positions: int) -> None:
        self.spec = spec
        self.weights = weights
        self.rope = RotaryEmbedding(spec.rope_dim, max_positions, spec.rope_theta)
        self.scale = spec.head_dim ** -0.5
        self._q_size = spec.num_heads * spec.head_dim
        self._kv_size = spec.num_kv_heads * spec.head_dim

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden], for every query token."""
        spec = self.spec
        t = input_ids.shape[0]
        hidden = self.weights.embed(input_ids)
        angles = self.rope.angles(positions)
        for layer in range(spec.num_layers):
            w = self.weights.layer(layer)
            x = F.rms_norm(hidden, (spec.hidden_size,), w.attn_norm, spec.rms_norm_eps)
            qkv = w.qkv(x)
            # q and k heads are adjacent in the fused output: one rotation for both
            qk = self.rope.apply(qkv[:, : self._q_size + self._kv_size].reshape(t, -1, spec.head_dim), angles)
            q, k = qk.split((spec.num_heads, spec.num_kv_heads), dim=1)
            v = qkv[:, self._q_size + self._kv_size:].reshape(t, spec.num_kv_heads, spec.head_dim)
            k_cache, v_cache = kv_cache.layer(layer)
            check = layer == 0         # the metadata is the same for every layer: check it once
            reshape_and_cache(k.to(k_cache.dtype), v.to(v_cache.dtype), k_cache, v_cache, meta.slot_mapping,
                              check_values=check)
            if meta.is_decode:
                attn = paged_attention_decode(q.to(k_cache.dtype), k_cache, v_cache, meta.block_tables,
                                              meta.seq_lens, self.scale, check_values=check)
            else:
                attn = paged_attention_prefill(q.to(k_cache.dtype), k_cache, v_cache, meta.block_tables,
                                               meta.query_start_loc, meta.seq_lens, self.scale,
                                               check_values=check)
            hidden = hidden + w.o(attn.reshape(t, self._q_size).to(hidden.dtype))
            x = F.rms_norm(hidden, (spec.hidden_size,), w.ffn_norm, spec.rms_norm_eps)
            gate, up = w.gate_up(x).chunk(2, dim=-1)
            hidden = hidden + w.down(F.silu(gate) * up)
        return F.rms_norm(hidden, (spec.hidden_size,), self.weights.output_norm, spec.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] for the given final hidden states [N, hidden]."""
        return self.weights.lm_head(hidden).float()
