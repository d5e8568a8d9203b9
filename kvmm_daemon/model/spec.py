"""ModelSpec: the shape of a Llama-family model, whatever file it came from.

Both model sources (a GGUF file, a Hugging Face safetensors directory) reduce to this one
frozen record plus tensors named by their GGUF names; everything that sizes pools, builds
the forward pass or keys the prefix cache reads it from here. Prior art: llama.cpp's
`llama_hparams`, vLLM's `ModelConfig` (only the fields a dense Llama needs are kept: no
MoE, sliding windows or rope scaling factors; a model that needs those is refused at load).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Hyper-parameters of a dense Llama-family decoder.

    Attributes (invariants checked in __post_init__):
      arch: architecture name as GGUF spells it ("llama").
      name: human-readable model name (general.name or the directory name).
      vocab_size: rows of token_embd.weight; every token id is < vocab_size.
      hidden_size: model width; == num_heads * head_dim for every supported model.
      intermediate_size: FFN width (ffn_gate/ffn_up rows).
      num_layers: decoder blocks, named blk.0 .. blk.{num_layers-1}.
      num_heads / num_kv_heads: query and key/value heads; num_heads % num_kv_heads == 0.
      head_dim: width of one attention head.
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base frequency.
      rope_dim: leading dims of each head that RoPE rotates (== head_dim for Llama).
      context_length: the context the model was trained for (an upper bound to serve).
      tie_word_embeddings: True iff there is no output.weight and the LM head reuses
        token_embd.weight.
      bos_token_id / eos_token_id: ids from the tokenizer metadata, None when absent.
      model_id: stable string naming the exact weights (hash of the file's header and
        samples of every tensor's bytes); part of persistent prefix-cache keys.
    """

    arch: str
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_dim: int
    context_length: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    model_id: str

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "rope_dim", "context_length"):
            value = getattr(self, field)
            assert isinstance(value, int) and value > 0, f"ModelSpec.{field}={value!r}"
        assert self.num_heads % self.num_kv_heads == 0, (self.num_heads, self.num_kv_heads)
        assert self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0, self.rope_dim
        assert self.rms_norm_eps > 0 and self.rope_theta > 0
        assert self.model_id, "model_id must not be empty"
        for field in ("bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            assert value is None or 0 <= value < self.vocab_size, f"ModelSpec.{field}={value!r}"

    @property
    def q_size(self) -> int:
        """Width of the query projection output (num_heads * head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of one of the key/value projection outputs (num_kv_heads * head_dim)."""
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V cache one token occupies across all layers."""
        assert dtype_bytes > 0
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward pass needs, by GGUF name, with its torch-order shape
        ([out_features, in_features] for projections). output.weight only when untied."""
        h, v, ff = self.hidden_size, self.vocab_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (v, h), "output_norm.weight": (h,)}
        if not self.tie_word_embeddings:
            shapes["output.weight"] = (v, h)
        for i in range(self.num_layers):
            p = f"blk.{i}."
            shapes.update({
                p + "attn_norm.weight": (h,), p + "attn_q.weight": (self.q_size, h),
                p + "attn_k.weight": (self.kv_size, h), p + "attn_v.weight": (self.kv_size, h),
                p + "attn_output.weight": (h, self.q_size), p + "ffn_norm.weight": (h,),
                p + "ffn_gate.weight": (ff, h), p + "ffn_up.weight": (ff, h),
                p + "ffn_down.weight": (h, ff)})
        return shapes
