"""SafetensorsModelFile: a tiny HF Llama written by the test, loaded like a GGUF."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model.model_file import open_model
from kvmm_daemon.model.safetensors_file import SafetensorsModelFile, permute_qk

from .tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    return path, open_model(path)


def test_spec(tiny):
    path, m = tiny
    assert isinstance(m, SafetensorsModelFile)
    s = m.spec
    assert (s.arch, s.vocab_size, s.hidden_size, s.intermediate_size) == ("llama", 320, 64, 128)
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == (2, 4, 2, 16)
    assert (s.rope_dim, s.rope_theta, s.rms_norm_eps, s.context_length) == (16, 1e4, 1e-5, 512)
    assert s.tie_word_embeddings and (s.bos_token_id, s.eos_token_id) == (1, 2)
    assert s.model_id.startswith("sha256:")
    assert open_model(path).spec.model_id == s.model_id
    assert set(m.tensor_names()) == set(s.tensor_shapes())


def test_tensors_keep_hf_values_except_q_k(tiny):
    path, m = tiny
    raw = load_file(str(path / "model.safetensors"))
    v = m.tensor("blk.1.attn_v.weight")
    assert v.ggml_type == "F32" and v.shape == (32, 64) and v.file_offset is not None
    assert not v.data.flags.writeable
    assert torch.equal(v.dequantize(), raw["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(m.tensor("token_embd.weight").dequantize(),
                       raw["model.embed_tokens.weight"])
    assert m.tensor("blk.0.attn_q.weight").file_offset is None  # a permuted copy


@pytest.mark.parametrize("which, n_head", [("q", 4), ("k", 2)])
def test_qk_permutation_is_llama_cpp_layout(tiny, which, n_head):
    path, m = tiny
    hf = load_file(str(path / "model.safetensors"))[f"model.layers.0.self_attn.{which}_proj.weight"]
    ours = m.tensor(f"blk.0.attn_{which}.weight").dequantize()
    d = 16
    for h in range(n_head):
        for i in range(d // 2):  # row 2i <- first half row i, row 2i+1 <- second half row i
            assert torch.equal(ours[h * d + 2 * i], hf[h * d + i])
            assert torch.equal(ours[h * d + 2 * i + 1], hf[h * d + d // 2 + i])


def rope_rotate_half(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Hugging Face Llama RoPE on [T, H, D]: pairs (i, i + D/2)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None, None].double() * freqs
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def rope_adjacent(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp RoPE (normal mode) on [T, H, D]: pairs (2i, 2i+1)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None, None].double() * freqs
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_permuted_weights_with_adjacent_rope_give_hf_attention_scores(tiny):
    path, m = tiny
    hf = load_file(str(path / "model.safetensors"))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pos = torch.arange(3, 10)

    def scores(wq, wk, rope):
        q = rope((x @ wq.double().T).view(7, 4, 16), pos, 1e4)
        k = rope((x @ wk.double().T).view(7, 2, 16), pos, 1e4).repeat_interleave(2, 1)
        return torch.einsum("thd,shd->hts", q, k)

    want = scores(hf["model.layers.0.self_attn.q_proj.weight"],
                  hf["model.layers.0.self_attn.k_proj.weight"], rope_rotate_half)
    got = scores(m.tensor("blk.0.attn_q.weight").dequantize(),
                 m.tensor("blk.0.attn_k.weight").dequantize(), rope_adjacent)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_permute_qk_on_raw_storage():
    w = np.arange(2 * 8 * 3, dtype=np.uint16).reshape(16, 3)  # dtype-agnostic (BF16 bits)
    p = permute_qk(w, 2)
    assert p.shape == w.shape and p.dtype == w.dtype
    assert list(p[:, 0] // 3) == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_tokenizer_and_chat_template(tiny):
    _, m = tiny
    tok = m.tokenizer
    assert tok.pre == "smollm" and not tok.add_bos
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.eos_token_ids == frozenset({0, 2})
    for text in ["The quick brown fox jumps 123 times!", "naïve 😀\n\tdef f(x):", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < 320 for i in ids) and tok.decode(ids) == text
    assert len(tok.encode("The quick brown fox")) < len("The quick brown fox")  # merges used
    prompt = m.chat_template.render([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, parse_special=True)
    assert ids.count(1) == 2 and ids.count(2) == 1


def test_sharded_checkpoint(tmp_path):
    path = write_tiny_llama(tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(path / fname))
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in shards.items() for n in part}}))
    m = open_model(path)
    assert torch.equal(m.tensor("blk.1.ffn_down.weight").dequantize(),
                       tensors["model.layers.1.mlp.down_proj.weight"])


def test_bf16_and_untied_lm_head(tmp_path):
    path = write_tiny_llama(tmp_path / "m", dtype=torch.bfloat16, tied=False)
    m = open_model(path)
    assert not m.spec.tie_word_embeddings and "output.weight" in m.tensor_names()
    head = m.tensor("output.weight")
    assert head.ggml_type == "BF16" and head.data.dtype == np.uint16
    raw = load_file(str(path / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(head.dequantize(), raw.float())
    q = m.tensor("blk.0.attn_q.weight")
    assert q.ggml_type == "BF16" and q.dequantize().abs().sum() > 0


def test_tie_word_embeddings_drops_a_saved_lm_head(tmp_path):
    path = write_tiny_llama(tmp_path / "m", tied=False)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    m = open_model(path)
    assert m.spec.tie_word_embeddings and "output.weight" not in m.tensor_names()


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    path = write_tiny_llama(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (path / "config.json").write_text(json.dumps(cfg))
    freqs = open_model(path).tensor("rope_freqs.weight")
    f = freqs.dequantize()
    assert freqs.ggml_type == "F32" and f.shape == (8,)
    assert f[0] == 1.0 and f[-1] == 8.0 and bool((f[1:] >= f[:-1]).all())
    wavelen = [2 * math.pi * 1e4 ** (2 * i / 16) for i in range(8)]
    for w, v in zip(wavelen, f.tolist()):  # the smooth band interpolates 1/factor .. 1
        if 8192 / 4 <= w <= 8192:
            s = (8192 / w - 1) / 3
            assert v == pytest.approx(1 / ((1 - s) / 8 + s))


def _edit(path, *, config=None, drop=None, add=None):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if drop or add:
        tensors = load_file(str(path / "model.safetensors"))
        for name in drop or ():
            del tensors[name]
        tensors.update(add or {})
        save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("edit, message", [
    (dict(config={"model_type": "mistral"}), "model_type 'mistral' is not supported"),
    (dict(drop=["model.layers.1.mlp.up_proj.weight"]), "lacks tensor.*blk.1.ffn_up.weight"),
    (dict(add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}), "biases"),
    (dict(add={"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.int8)}),
     "dtype I8"),
    (dict(config={"intermediate_size": 96}), "has shape \\[128, 64\\].*fix config.json"),
    (dict(config={"rope_scaling": {"type": "yarn", "factor": 4.0}}), "rope_scaling 'yarn'"),
])
def test_bad_directories(tmp_path, edit, message):
    path = _edit(write_tiny_llama(tmp_path / "m"), **edit)
    with pytest.raises(ModelLoadError, match=message):
        open_model(path)


def test_missing_files(tmp_path):
    path = write_tiny_llama(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="is a single safetensors file"):
        open_model(path / "model.safetensors")
    (path / "tokenizer.json").unlink()
    m = open_model(path)  # weights still load; the tokenizer is what is missing
    assert m.spec.bos_token_id == 1
    with pytest.raises(ModelLoadError, match="has no tokenizer.json"):
        m.tokenizer
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        open_model(path)
