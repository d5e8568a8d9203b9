"""RandomGGUF: a tiny variant (2 layers, hidden 64) read back by kvmm's GGUF reader, with the
embedded model's tokenizer, tame weight statistics and an atomic write."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from kvmm_daemon.bench.random_gguf import RandomGGUF
from kvmm_daemon.model.gguf_file import GGUFModelFile
from kvmm_daemon.model.model_file import default_model_path
from tests.bench.conftest import needs_llama_cpp

TINY = RandomGGUF(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, seed=3)


def test_tiny_random_gguf_loads_with_kvmm_and_tokenizes_like_the_embedded_model(tmp_path):
    path = TINY.write(tmp_path / "tiny.gguf", default_model_path())
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]       # no temporary left
    model, embedded = GGUFModelFile(path), GGUFModelFile(default_model_path())
    spec = model.spec
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
            spec.intermediate_size) == (2, 64, 4, 2, 128)
    assert spec.tie_word_embeddings and not model.has_tensor("output.weight")
    assert spec.vocab_size == embedded.spec.vocab_size
    assert model.tokenizer.encode("Hello, world") == embedded.tokenizer.encode("Hello, world")
    assert model.chat_template is not None
    assert model.tensor("blk.1.ffn_down.weight").ggml_type == "Q4_1"
    assert model.tensor("token_embd.weight").ggml_type == "Q8_0"
    norm = model.tensor("blk.0.attn_norm.weight")
    assert norm.ggml_type == "F32" and np.all(norm.data == 1)
    for name, qtype in (("blk.0.ffn_up.weight", "Q4_1"), ("token_embd.weight", "Q8_0")):
        t = model.tensor(name)
        w = dequantize(np.asarray(t.data), GGMLQuantizationType[qtype])
        assert w.shape == t.shape
        assert abs(float(w.mean())) < 0.005 and 0.015 < float(w.std()) < 0.025


def test_the_seed_decides_the_weights(tmp_path):
    a = TINY.write(tmp_path / "a.gguf", default_model_path()).read_bytes()
    assert TINY.write(tmp_path / "b.gguf", default_model_path()).read_bytes() == a
    other = RandomGGUF(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, seed=4)
    assert other.write(tmp_path / "c.gguf", default_model_path()).read_bytes() != a


def test_impossible_shapes_name_the_fix():
    with pytest.raises(ValueError, match="divisible"):
        RandomGGUF(hidden=2048, heads=30)
    with pytest.raises(ValueError, match="multiples of 32"):
        RandomGGUF(hidden=96, heads=4, kv_heads=2, ffn=100)


@needs_llama_cpp
def test_llama_cpp_decodes_the_tiny_random_gguf(tmp_path):
    path = TINY.write(tmp_path / "tiny.gguf", default_model_path())
    out = subprocess.run([sys.executable, "-m", "kvmm_daemon.bench.llama_cpp_limited", "--model", str(path),
                          "--threads", "1", "--steps", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["steps"] == 2 and got["decode_tokens_per_s"] > 0
