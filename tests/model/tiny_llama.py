"""Test helper: write a tiny random-weight Llama as a Hugging Face safetensors directory.

`write_tiny_llama(dir)` produces config.json, model.safetensors (random float weights in
HF layout, i.e. un-permuted Q/K), tokenizer.json (a byte-level BPE with SmolLM's
Digits+ByteLevel pre-tokenizer, merges learned from a small built-in corpus) and
tokenizer_config.json (ChatML chat template, <|im_start|>/<|im_end|> as BOS/EOS), so engine
and daemon tests can run a whole model in milliseconds through open_model(dir).
Deterministic for a given set of arguments.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.
Paged attention splits the KV cache into fixed-size blocks so that memory is not wasted.
A block table maps the logical blocks of a sequence to physical blocks in the pool.
def forward(self, x):
    return self.down(self.act(self.gate(x)) * self.up(x))
In 2024 the model had 135 million parameters and 30 layers; it's small, isn't it?
We'll see whether the scheduler preempts the newest request when blocks run short.
"""


def _byte_chars() -> list[str]:
    """GPT-2's printable alphabet for the 256 byte values."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training on CORPUS (most frequent pair, ties by text), byte-encoded."""
    chars = _byte_chars()
    words = collections.Counter(
        "".join(chars[b] for b in w.encode("utf-8"))
        for w in re.findall(r" ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+", CORPUS))
    split = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, count in words.items():
            syms = split[w]
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for w in words:
            syms, out, i = split[w], [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            split[w] = out
    return merges


def tiny_tokenizer_json(vocab: int) -> dict:
    """tokenizer.json content with at most `vocab` ids (3 specials, 256 bytes, merges)."""
    assert vocab >= len(SPECIAL_TOKENS) + 256, vocab
    merges = _learn_merges(vocab - len(SPECIAL_TOKENS) - 256)
    ids: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in _byte_chars():
        ids[ch] = len(ids)
    for a, b in merges:
        ids.setdefault(a + b, len(ids))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, t in enumerate(SPECIAL_TOKENS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": ids,
                  "merges": [f"{a} {b}" for a, b in merges]},
    }


def write_tiny_llama(directory: str | Path, *, vocab: int = 320, hidden: int = 64,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 128, seed: int = 0, tied: bool = True,
                     dtype: torch.dtype = torch.float32, context: int = 512) -> Path:
    """Write the tiny model into `directory` (created if needed) and return its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": context,
        "vocab_size": vocab, "tie_word_embeddings": tied, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0),
               "model.norm.weight": (1 + rand(hidden, scale=0.1).float()).to(dtype)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": (1 + rand(hidden, scale=0.1).float()).to(dtype),
            p + "post_attention_layernorm.weight": (1 + rand(hidden, scale=0.1).float()).to(dtype),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden, scale=hidden ** -0.5),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden, scale=hidden ** -0.5),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden, scale=hidden ** -0.5),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim, scale=hidden ** -0.5),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden, scale=hidden ** -0.5),
            p + "mlp.up_proj.weight": rand(intermediate, hidden, scale=hidden ** -0.5),
            p + "mlp.down_proj.weight": rand(hidden, intermediate, scale=intermediate ** -0.5),
        })
    if not tied:
        tensors["lm_head.weight"] = rand(vocab, hidden, scale=hidden ** -0.5)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "tokenizer.json").write_text(json.dumps(tiny_tokenizer_json(vocab),
                                                    ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": context}))
    return path


def write_sensitive_llama(directory: str | Path, *, vocab: int = 320) -> Path:
    """The tests' tiny Llama, untied and with sharper attention, so that its greedy
    continuation depends on the KV of the whole context: a changed block of 4 tokens
    anywhere in a 40-100 token history changed the next 6 greedy tokens in 40 of 40 tries.
    (The shared tiny model ties its embeddings, so its logits are ruled by the current
    token's own embedding: it repeats its input whatever the KV holds, and wrong KV would
    go unnoticed.)"""
    from safetensors.torch import load_file, save_file

    path = write_tiny_llama(directory, vocab=vocab, hidden=64, layers=2, heads=4, kv_heads=2,
                            intermediate=128, seed=0, tied=False)
    tensors = load_file(str(path / "model.safetensors"))
    scales = {"q_proj": 4.0, "k_proj": 4.0, "v_proj": 2.0, "o_proj": 2.0, "embed_tokens": 0.3}
    for name in tensors:
        for part, scale in scales.items():
            if part in name:
                tensors[name] = tensors[name] * scale
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
