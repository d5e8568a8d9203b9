"""GGUFModelFile: the embedded model's spec/tensors, tiny converted models, load errors."""

import struct

import numpy as np
import pytest
import torch

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model.gguf_file import GGUFModelFile
from kvmm_daemon.model.model_file import default_model_path, open_model

from .tiny_gguf import gguf_tensors, write_tiny_gguf
from .tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def smollm():
    return GGUFModelFile(default_model_path())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-hf"))


def test_embedded_model_spec(smollm):
    s = smollm.spec
    assert (s.arch, s.num_layers, s.hidden_size, s.intermediate_size) == ("llama", 30, 576, 1536)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.rope_dim) == (9, 3, 64, 64)
    assert (s.vocab_size, s.context_length, s.rope_theta) == (49152, 8192, 100000.0)
    assert s.rms_norm_eps == pytest.approx(1e-5)
    assert s.tie_word_embeddings and (s.bos_token_id, s.eos_token_id) == (1, 2)
    assert s.kv_bytes_per_token(2) == 2 * 30 * 3 * 64 * 2
    assert s.model_id.startswith("sha256:") and len(s.model_id) == 7 + 64
    assert GGUFModelFile(default_model_path()).spec.model_id == s.model_id  # stable


def test_embedded_model_tensors_are_views_of_the_file(smollm):
    names = smollm.tensor_names()
    assert len(names) == 272 and "output.weight" not in names
    types = [smollm.tensor(n).ggml_type for n in names]
    assert (types.count("Q4_1"), types.count("F32"), types.count("Q8_0")) == (210, 61, 1)
    q = smollm.tensor("blk.3.attn_k.weight")
    assert q.shape == (192, 576) and q.data.shape == (192, 360) and not q.data.flags.writeable
    with open(default_model_path(), "rb") as f:
        f.seek(q.file_offset)
        assert f.read(64) == q.data.tobytes()[:64]
    norm = smollm.tensor("output_norm.weight")
    assert norm.data.dtype == np.float32 and norm.shape == (576,)


def test_embedded_chat_template_and_tokenizer(smollm):
    text = smollm.chat_template.render([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                    "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert smollm.tokenizer is smollm.tokenizer
    assert smollm.metadata["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.parametrize("weight_type", ["F32", "F16", "Q8_0", "Q4_1"])
def test_tiny_gguf_matches_its_safetensors_source(tmp_path, hf_dir, weight_type):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf_dir, weight_type=weight_type)
    g = open_model(path)
    h = open_model(hf_dir)
    assert isinstance(g, GGUFModelFile)
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "rope_theta", "rope_dim", "context_length",
              "tie_word_embeddings", "bos_token_id", "eos_token_id")
    assert [getattr(g.spec, f) for f in fields] == [getattr(h.spec, f) for f in fields]
    assert set(g.spec.tensor_shapes()) <= set(g.tensor_names())
    expected = gguf_tensors(hf_dir)
    tol = {"F32": 0, "F16": 1e-3, "Q8_0": 0.05, "Q4_1": 0.3}[weight_type]
    for name in g.spec.tensor_shapes():
        ours, src = g.tensor(name).dequantize(), h.tensor(name).dequantize()
        assert torch.equal(src, expected[name])  # loader permutes like the converter
        assert (ours - src).abs().max() <= tol * src.abs().max(), name
    for text in ["The quick brown fox 2024!", "it's  naïve\n\tcode();", "<|im_end|>"]:
        for special in (False, True):
            assert g.tokenizer.encode(text, special) == h.tokenizer.encode(text, special)
    assert g.chat_template.render([{"role": "user", "content": "x"}]) == \
        h.chat_template.render([{"role": "user", "content": "x"}])


def test_model_id_tracks_the_weights(tmp_path, hf_dir):
    a = write_tiny_gguf(tmp_path / "a.gguf", hf_dir)
    b = write_tiny_gguf(tmp_path / "b.gguf", hf_dir)
    other = write_tiny_llama(tmp_path / "other", seed=1)
    c = write_tiny_gguf(tmp_path / "c.gguf", other)
    ids = [GGUFModelFile(p).spec.model_id for p in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]


def test_unsupported_architecture(tmp_path, hf_dir):
    path = write_tiny_gguf(tmp_path / "q.gguf", hf_dir, arch="qwen2")
    with pytest.raises(ModelLoadError, match="architecture 'qwen2' is not supported "
                                             r"\(supported: llama"):
        open_model(path)


def test_missing_tensors(tmp_path, hf_dir):
    path = write_tiny_gguf(tmp_path / "m.gguf", hf_dir,
                           drop=("blk.1.ffn_up.weight", "output_norm.weight"))
    with pytest.raises(ModelLoadError, match="lacks tensor.*output_norm.weight.*"
                                             "blk.1.ffn_up.weight"):
        open_model(path)


def test_unsupported_tensor_type(tmp_path, hf_dir):
    path = write_tiny_gguf(tmp_path / "t.gguf", hf_dir,
                           raw_types={"blk.0.attn_v.weight": "IQ4_NL"})
    with pytest.raises(ModelLoadError) as err:
        open_model(path)
    msg = str(err.value)
    assert "blk.0.attn_v.weight" in msg and "IQ4_NL" in msg
    assert "supported types: F32, F16, BF16, Q8_0" in msg


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model file .*nope.gguf not found; pass "
                                             "--model PATH to a GGUF file or a safetensors"):
        open_model(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content, message", [
    (b"not a model at all", "is not a GGUF file"),
    (b"", "is not a GGUF file"),
    (b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 1, 5), "truncated or corrupt"),
    (b"GGUF" + struct.pack("<I", 1), "version 1 files are not supported"),
    (b"GGUF" + struct.pack(">I", 3), "big-endian GGUF"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        open_model(path)
    if content.startswith(b"GGUF"):
        with pytest.raises(ModelLoadError, match=message):
            GGUFModelFile(path)


def test_truncated_tensor_data(tmp_path, hf_dir):
    path = write_tiny_gguf(tmp_path / "full.gguf", hf_dir)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        GGUFModelFile(cut)
