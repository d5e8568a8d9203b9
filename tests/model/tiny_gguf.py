"""Test helper: turn a tiny Hugging Face Llama directory into a GGUF file.

`write_tiny_gguf(path, hf_dir)` does what llama.cpp's convert_hf_to_gguf.py does for a
LlamaForCausalLM, written independently with torch ops: GGUF tensor names, Q/K rows
regrouped so RoPE rotates adjacent pairs, llama.* hyper-parameters and the gpt2/smollm
tokenizer metadata. Projection weights can be stored as F32, F16, Q8_0 or Q4_1, so tests
get a quantized model of the same shape as the embedded one in milliseconds. Knobs for
error tests: `arch`, `drop` (tensor names to leave out), `raw_types` (name -> GGML type
written with filler bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.torch import load_file

_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def rope_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head: [x_0..x_{D/2-1} | y_0..y_{D/2-1}] -> x_0, y_0, x_1, y_1, ..."""
    out_features, in_features = w.shape
    d = out_features // n_head
    return w.view(n_head, 2, d // 2, in_features).transpose(1, 2).reshape(out_features,
                                                                        in_features)


def gguf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny model's tensors under GGUF names, Q/K permuted, float32."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    out = {}
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        t = t.float()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = t
        elif name == "model.norm.weight":
            out["output_norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        else:
            _, _, layer, rest = name.split(".", 3)
            role = _LAYER[rest.removesuffix(".weight")]
            if role == "attn_q":
                t = rope_pairs(t, cfg["num_attention_heads"])
            elif role == "attn_k":
                t = rope_pairs(t, cfg["num_key_value_heads"])
            out[f"blk.{layer}.{role}.weight"] = t
    return out


def write_tiny_gguf(path: str | Path, hf_dir: str | Path, *, weight_type: str = "F32",
                    arch: str = "llama", drop: tuple[str, ...] = (),
                    raw_types: dict[str, str] | None = None,
                    types: dict[str, str] | None = None) -> Path:
    """Write the GGUF of `hf_dir` (a write_tiny_llama directory) to `path`; `types` gives
    single tensors another type than `weight_type` (SmolLM2: Q4_1, token_embd Q8_0)."""
    path, hf_dir = Path(path), Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    special = {a["id"] for a in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([vocab.get(i, f"[PAD{i}]") for i in range(cfg["vocab_size"])])
    w.add_token_types([3 if i in special else 1 if i in vocab else 5
                       for i in range(cfg["vocab_size"])])
    w.add_token_merges(tj["model"]["merges"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tcfg["chat_template"])
    raw_types = raw_types or {}
    for name, t in gguf_tensors(hf_dir).items():
        if name in drop:
            continue
        if name in raw_types:
            qtype = GGMLQuantizationType[raw_types[name]]
            block, size = GGML_QUANT_SIZES[qtype]
            filler = np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8)
            w.add_tensor(name, filler, raw_dtype=qtype)
        elif t.dim() == 2 and (types or {}).get(name, weight_type) in ("Q8_0", "Q4_1"):
            qtype = GGMLQuantizationType[(types or {}).get(name, weight_type)]
            w.add_tensor(name, quantize(t.numpy(), qtype), raw_dtype=qtype)
        elif t.dim() == 2 and weight_type == "F16":
            w.add_tensor(name, t.numpy().astype(np.float16))
        else:
            w.add_tensor(name, t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
