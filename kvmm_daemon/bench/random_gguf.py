"""RandomGGUF: a Llama GGUF with random weights of a real model's shape, for benchmarks that need
a model larger than the embedded one (weights streamed from flash at 1B scale) without
downloading one.

The default shape is a 1B Llama (Llama-3.2-1B-like: 16 layers, hidden 2048, 32 heads, 8 KV
heads, FFN 8192); vocabulary, tokenizer and chat template are copied from the embedded
SmolLM2 GGUF's metadata so that tokenizing and chat work, and the layout follows SmolLM2's
file: Q4_1 layer linears, Q8_0 token_embd tied as the output (no output.weight), F32 norms
of 1. Quantized blocks are drawn directly (uniform codes, a scale giving `std`, zero mean), so
a 700 MB file takes seconds, not a quantizer's minutes; with std 0.02 and unit norms the
forward is numerically tame (outputs are noise, speeds are real).
Tensors are streamed to a temporary file beside the target and renamed into place, so a
crash leaves no half-written model under the final name.
Left out: other quantization types, untied output heads, rope scaling.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

Q4_1, Q8_0 = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True, slots=True)
class RandomGGUF:
    """The shape and seed of a random Llama GGUF (validated on construction)."""
    layers: int = 16
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    context_length: int = 8192
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    std: float = 0.02
    seed: int = 0
    name: str = "random-llama"

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.heads, self.kv_heads, self.ffn) <= 0:
            raise ValueError(f"{self}: every size must be positive")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden} must divide into {self.heads} heads and the heads "
                             f"into {self.kv_heads} KV heads; pick divisible sizes")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"head dim {self.hidden // self.heads} is odd; RoPE needs an even one")
        block = GGML_QUANT_SIZES[Q4_1][0]
        if self.hidden % block or self.ffn % block:
            raise ValueError(f"hidden {self.hidden} and ffn {self.ffn} must be multiples of {block} "
                             "(the Q4_1/Q8_0 block size)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self, vocab: int) -> dict[str, tuple[tuple[int, int] | tuple[int], GGMLQuantizationType]]:
        """name -> ((rows, columns) or (length,), type), in file order (GGUF dims reversed)."""
        kv = self.kv_heads * self.head_dim
        out: dict = {"token_embd.weight": ((vocab, self.hidden), Q8_0)}
        linear = {"attn_q": (self.hidden, self.hidden), "attn_k": (kv, self.hidden),
                  "attn_v": (kv, self.hidden), "attn_output": (self.hidden, self.hidden),
                  "ffn_gate": (self.ffn, self.hidden), "ffn_up": (self.ffn, self.hidden),
                  "ffn_down": (self.hidden, self.ffn)}
        for i in range(self.layers):
            out[f"blk.{i}.attn_norm.weight"] = ((self.hidden,), GGMLQuantizationType.F32)
            for role in _LINEARS:
                out[f"blk.{i}.{role}.weight"] = (linear[role], Q4_1)
            out[f"blk.{i}.ffn_norm.weight"] = ((self.hidden,), GGMLQuantizationType.F32)
        out["output_norm.weight"] = ((self.hidden,), GGMLQuantizationType.F32)
        return out

    def write(self, path: str | os.PathLike, tokenizer_from: str | os.PathLike) -> Path:
        """Write the model to `path` atomically, with the tokenizer metadata of the GGUF
        `tokenizer_from`; returns the path."""
        path = Path(path)
        source = GGUFReader(str(tokenizer_from))
        tok_fields = {k: f for k, f in source.fields.items() if k.startswith("tokenizer.")}
        if "tokenizer.ggml.tokens" not in tok_fields:
            raise ValueError(f"{tokenizer_from} has no tokenizer.ggml.tokens; take the tokenizer "
                             "from a complete GGUF model (the embedded SmolLM2 one)")
        vocab = len(tok_fields["tokenizer.ggml.tokens"].data)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        w = GGUFWriter(str(tmp), "llama")
        try:
            self._add_metadata(w, vocab)
            for key, field in tok_fields.items():
                sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
                w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
            shapes = self.tensor_shapes(vocab)
            for name, (shape, qtype) in shapes.items():
                block, size = GGML_QUANT_SIZES[qtype]
                byte_shape = (*shape[:-1], shape[-1] // block * size)
                if qtype == GGMLQuantizationType.F32:
                    w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
                else:
                    w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                      raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            rng = np.random.default_rng(self.seed)
            for shape, qtype in shapes.values():
                w.write_tensor_data(self._random_tensor(rng, shape, qtype))
            w.close()
            os.replace(tmp, path)
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise
        return path

    def _add_metadata(self, w: GGUFWriter, vocab: int) -> None:
        w.add_name(self.name)
        w.add_file_type(3)  # LLAMA_FTYPE_MOSTLY_Q4_1
        w.add_block_count(self.layers)
        w.add_context_length(self.context_length)
        w.add_embedding_length(self.hidden)
        w.add_feed_forward_length(self.ffn)
        w.add_head_count(self.heads)
        w.add_head_count_kv(self.kv_heads)
        w.add_rope_freq_base(self.rope_theta)
        w.add_rope_dimension_count(self.head_dim)
        w.add_layer_norm_rms_eps(self.rms_norm_eps)
        w.add_vocab_size(vocab)

    def _random_tensor(self, rng: np.random.Generator, shape: tuple, qtype: GGMLQuantizationType) -> np.ndarray:
        if qtype == GGMLQuantizationType.F32:
            return np.ones(shape, np.float32)
        rows, cols = shape
        block, size = GGML_QUANT_SIZES[qtype]
        blocks = np.frombuffer(rng.bytes(rows * cols // block * size), np.uint8)
        blocks = blocks.reshape(rows, cols // block, size).copy()
        if qtype == Q4_1:       # d*q + m, q uniform in 0..15: std d*sqrt(255/12), mean 7.5d + m
            d = self.std / np.sqrt(255 / 12)
            head = np.array([d, -7.5 * d], np.float16).view(np.uint8)
        else:                   # Q8_0: d*q, q uniform in -128..127 (std ~ 73.9)
            d = self.std / np.sqrt((256 ** 2 - 1) / 12)
            head = np.array([d], np.float16).view(np.uint8)
        blocks[:, :, :head.size] = head
        return blocks.reshape(rows, -1)
