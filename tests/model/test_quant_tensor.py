"""QuantTensor: dequantization and quantized parts agree with gguf.quants bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kvmm_daemon.errors import ModelLoadError
from kvmm_daemon.model.gguf_file import GGUFModelFile
from kvmm_daemon.model.model_file import default_model_path
from kvmm_daemon.model.quant_tensor import QuantTensor, check_supported_type, storage_nbytes


def quantized(name: str, values: np.ndarray, ggml_type: str) -> QuantTensor:
    raw = gguf_quantize(values, GGMLQuantizationType[ggml_type])
    return QuantTensor(name, ggml_type, values.shape, raw)


def reference(t: QuantTensor) -> np.ndarray:
    return gguf_dequantize(np.asarray(t.data), GGMLQuantizationType[t.ggml_type]).reshape(t.shape)


@pytest.fixture(scope="module")
def model():
    return GGUFModelFile(default_model_path())


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight",
                                  "blk.7.ffn_down.weight", "blk.29.attn_v.weight"])
def test_file_tensors_dequantize_like_gguf(model, name):
    t = model.tensor(name)
    assert t.ggml_type in ("Q4_1", "Q8_0")
    out = t.dequantize()
    assert out.dtype == torch.float32 and tuple(out.shape) == t.shape
    assert np.array_equal(out.numpy(), reference(t))


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0", "Q4_0", "Q5_0", "Q5_1"])
def test_random_blocks_dequantize_like_gguf(ggml_type):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((24, 96)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    t = quantized("w", values, ggml_type)
    assert t.is_quantized and t.nbytes == storage_nbytes(ggml_type, (24, 96))
    out = t.dequantize().numpy()
    assert np.array_equal(out, reference(t))
    assert np.abs(out - values).max() < 0.2 * np.abs(values).max()


def test_q4_1_parts_rebuild_the_weight():
    values = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    t = quantized("w", values, "Q4_1")
    d, m, q = t.q4_1_parts()
    assert d.shape == m.shape == (8, 2) and q.shape == (8, 64) and q.dtype == torch.uint8
    assert int(q.max()) <= 15
    rebuilt = d.repeat_interleave(32, 1) * q.float() + m.repeat_interleave(32, 1)
    assert torch.equal(rebuilt, t.dequantize())


def test_q8_0_parts_rebuild_the_weight(model):
    t = model.tensor("token_embd.weight")
    d, q = t.q8_0_parts()
    assert d.shape == (49152, 18) and q.shape == (49152, 576) and q.dtype == torch.int8
    rows = slice(1000, 1100)
    rebuilt = d[rows].repeat_interleave(32, 1) * q[rows].float()
    assert torch.equal(rebuilt, t.dequantize()[rows])
    with pytest.raises(ValueError, match="is Q8_0, not Q4_1"):
        t.q4_1_parts()


def test_k_quants_go_through_gguf():
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (4, 210), dtype=np.uint8)  # 4 rows of one Q6_K block
    raw[:, 208:210] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # sane scale d
    t = QuantTensor("w", "Q6_K", (4, 256), raw)
    assert np.array_equal(t.dequantize().numpy(), reference(t))


def test_float_types():
    values = np.random.default_rng(3).standard_normal((3, 5)).astype(np.float32)
    f32 = QuantTensor("a", "F32", (3, 5), values)
    assert torch.equal(f32.dequantize(), torch.from_numpy(values))
    f16 = QuantTensor("b", "F16", (3, 5), values.astype(np.float16))
    assert torch.equal(f16.dequantize(), torch.from_numpy(values.astype(np.float16)).float())
    bf16_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    bf16 = QuantTensor("c", "BF16", (3, 5), bf16_bits.view(np.uint16))
    assert torch.equal(bf16.dequantize(), torch.from_numpy(values).to(torch.bfloat16).float())


def test_unsupported_type_names_tensor_type_and_supported_list():
    with pytest.raises(ModelLoadError) as err:
        check_supported_type("blk.0.attn_q.weight", "IQ2_XXS", "m.gguf")
    msg = str(err.value)
    assert "blk.0.attn_q.weight" in msg and "IQ2_XXS" in msg
    assert "supported types: F32, F16, BF16, Q8_0" in msg and "Q4_1" in msg
    assert "\n" not in msg


def test_data_size_must_match_shape():
    with pytest.raises(AssertionError):
        QuantTensor("w", "Q8_0", (2, 64), np.zeros((2, 34), np.uint8))
