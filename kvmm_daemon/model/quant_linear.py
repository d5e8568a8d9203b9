"""Linear layers, LM head and embedding that keep GGUF-quantized weights quantized (CPU).

A GGUF Q4_1 block of 32 weights is (f16 d, f16 m, 16 bytes of nibbles) with w = d*q + m,
q in 0..15 (low nibbles are elements 0..15, high nibbles 16..31); a Q8_0 block is (f16 d,
32 x int8 q) with w = d*q (llama.cpp `ggml-quants.c`). PyTorch's CPU int4 weight-only kernel
(`_weight_int4pack_mm_for_cpu`, the "tinygemm" layout of gpt-fast/torchao) computes
w = (q - 8) * s + z per group of `groupsize` input elements, with `scales_and_zeros` of shape
[in/group, out, 2]. With group 32, s = d and z = m + 8*d this *is* Q4_1, nibble for nibble:
the weights stay at 4.5 bits each. The kernel is vectorized only for bfloat16 (float32 and
float16 fall back to a scalar loop ~40x slower), so the fast path rounds the activations, s,
z and the output to bfloat16 and accumulates in float32: bf16-level error (~0.3% of the
output norm), finer than llama.cpp's own Q4_1 path, which quantizes activations to 8 bits.

Modes (per weight; `mode_for` states the "auto" policy, scripts/bench_quant_linear.py the
measurements behind it):
  int4      Q4_1 kept packed (4.5 bits/weight); wider weights are never cut to 4 bits and
            take their "auto" form instead.
  int8      per-output-row int8 (`_weight_int8pack_mm`), re-quantized: lossy (0.8-1.2% of
            the output norm on SmolLM2's layers and Q8_0 token_embd), 8 bits/weight.
  float32   dequantized float32: exact, 32 bits/weight.
  bfloat16  dequantized bfloat16 weights and activations (~0.27%), 16 bits/weight.
  float16   dequantized float16 (~0.035%), 16 bits/weight; fast for one token only (a
            float16 GEMM needs AVX512-FP16, which AVX512 x86 parts mostly lack).
  q8_0      Q8_0 kept as its GGUF blocks (8.5 bits/weight) and multiplied straight from
            them in float32 (kernels/q8_0_linear.py): exact weights, float32 sums in a fixed
            order per output, so a chunk of rows gives the whole matrix's bits. "auto" picks
            it for an LM head of a Q8_0 table; without the native library torch dequantizes
            and multiplies (close, not the same bits; one choice per process).

Other GGUF types (F16, Q4_K, Q6_K...) are taken dequantized, in a dense mode. Left out:
autograd, and the q8_0 kernel for the layers' linears (the head is the only Q8_0 table in the
models served; "auto" keeps other Q8_0 weights in bfloat16).
The int4 packing follows the CPU's vector width, so packed weights are made at load time
on the machine that runs them and never stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kernels import q8_0_linear
from kvmm_daemon.errors import ConfigError, ModelLoadError

GROUP = 32  # elements per Q4_1/Q8_0 block, and the int4 kernel's group size
MODES = ("auto", "int4", "int8", "float32", "bfloat16", "float16", "q8_0")
_DENSE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True, slots=True, eq=False)
class QuantWeight:
    """One weight matrix [out, in] as its GGUF parts, blocks split out (no float copy).

    Q4_1: q uint8 codes 0..15 [out, in]; d, m float32 (exact f16 values) [out, in/32].
    Q8_0: q int8 [out, in]; d float32 [out, in/32]; m None.
    Any other type (F32, F16, BF16, Q4_K...): q the float32 weights [out, in], exactly the
    stored values dequantized; d, m None.
    """

    ggml_type: str
    shape: tuple[int, int]
    q: np.ndarray
    d: np.ndarray | None = None
    m: np.ndarray | None = None

    def __post_init__(self) -> None:
        out_f, in_f = self.shape
        if self.q.shape != (out_f, in_f):
            raise ModelLoadError(f"{self.ggml_type} codes have shape {self.q.shape}, expected "
                                 f"{self.shape}; pass q as [out, in]")
        if self.ggml_type in _BLOCK_BYTES:
            groups = (out_f, in_f // GROUP)
            if in_f % GROUP or self.d is None or self.d.shape != groups:
                raise ModelLoadError(f"{self.ggml_type} weight {self.shape} needs in % 32 == 0 "
                                     f"and d of shape {groups}")
            if (self.ggml_type == "Q4_1") != (self.m is not None) or (
                    self.m is not None and self.m.shape != groups):
                raise ModelLoadError(f"{self.ggml_type} weight: m must be {groups} for Q4_1 "
                                     f"and absent otherwise")
        elif self.q.dtype != np.float32 or self.d is not None or self.m is not None:
            raise ModelLoadError(f"{self.ggml_type} weight must be given dequantized, as one "
                                 f"float32 array [out, in]")

    @classmethod
    def from_parts(cls, ggml_type: str, parts: tuple[np.ndarray, ...]) -> QuantWeight:
        """From q4_1_parts() (d, m, q), q8_0_parts() (d, q), or (w,) float [out, in] for any
        other type; numpy arrays or torch tensors."""
        arrs = [p.numpy() if isinstance(p, torch.Tensor) else np.asarray(p) for p in parts]
        if ggml_type == "Q4_1" and len(arrs) == 3:
            d, m, q = arrs
            if q.size and (q.min() < 0 or q.max() > 15):
                raise ModelLoadError("Q4_1 codes must lie in 0..15; pass unpacked nibbles")
            return cls("Q4_1", q.shape, q.astype(np.uint8), _f32(d), _f32(m))
        if ggml_type == "Q8_0" and len(arrs) == 2:
            d, q = arrs
            return cls("Q8_0", q.shape, q.astype(np.int8), _f32(d))
        if ggml_type not in _BLOCK_BYTES and len(arrs) == 1:
            return cls(ggml_type, arrs[0].shape, _f32(arrs[0]))
        raise ModelLoadError(f"{ggml_type} parts of {len(arrs)} arrays: give (d, m, q) for "
                             f"Q4_1, (d, q) for Q8_0, (w,) dequantized for other types")

    @classmethod
    def from_blocks(cls, ggml_type: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantWeight:
        """From the raw GGUF bytes of a Q4_1/Q8_0 tensor of torch shape [out, in]."""
        out_f, in_f = shape
        nb = in_f // GROUP
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(out_f, nb, _BLOCK_BYTES[ggml_type])
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        if ggml_type == "Q8_0":
            return cls.from_parts("Q8_0", (d, blocks[..., 2:].copy().view(np.int8).reshape(shape)))
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        nib = blocks[..., 4:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).reshape(shape)
        return cls.from_parts("Q4_1", (d, m, q))

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def rows(self, start: int, stop: int) -> QuantWeight:
        """Output rows [start, stop) as a weight of their own (no copy of the codes)."""
        if not 0 <= start < stop <= self.out_features:
            raise ValueError(f"rows [{start}, {stop}) outside 0..{self.out_features}")
        part = (lambda a: None if a is None else a[start:stop])
        return QuantWeight(self.ggml_type, (stop - start, self.in_features), self.q[start:stop],
                           part(self.d), part(self.m))

    def blocks(self) -> torch.Tensor:
        """A Q8_0 weight's GGUF blocks (uint8, flat, row-major): the inverse of `from_blocks`
        (d is kept as its exact f16 value)."""
        assert self.ggml_type == "Q8_0", "only a Q8_0 weight has Q8_0 blocks"
        d = self.d.astype(np.float16).view(np.uint8).reshape(self.out_features, -1, 2)
        q = self.q.view(np.uint8).reshape(self.out_features, -1, GROUP)
        return torch.from_numpy(np.ascontiguousarray(np.concatenate([d, q], axis=-1)).reshape(-1))

    def dequantize(self) -> np.ndarray:
        """Float32 [out, in], bit-identical to gguf.quants.dequantize."""
        if self.ggml_type not in _BLOCK_BYTES:
            return self.q
        g = self.q.reshape(self.out_features, -1, GROUP).astype(np.float32)
        w = self.d[..., None] * g if self.m is None else g * self.d[..., None] + self.m[..., None]
        return w.reshape(self.shape)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def from_gguf_tensor(t: Any) -> QuantWeight:
    """A `gguf.GGUFReader` tensor (ReaderTensor) as a QuantWeight; shape reversed to [out, in]."""
    name = t.tensor_type.name
    shape = tuple(int(n) for n in reversed(t.shape))
    if len(shape) != 2:
        raise ModelLoadError(f"tensor {t.name} has {len(shape)} dims; a linear needs 2")
    if name in _BLOCK_BYTES:
        return QuantWeight.from_blocks(name, np.asarray(t.data), shape)
    if name in ("F32", "F16"):
        return QuantWeight.from_parts(name, (np.asarray(t.data).reshape(shape),))
    from gguf.quants import dequantize
    try:
        dense = dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(f"tensor {t.name} is {name}, which gguf cannot dequantize; "
                             f"use a GGUF quantized as Q4_1 or Q8_0") from None
    return QuantWeight.from_parts(name, (dense.reshape(shape),))


def as_quant_weight(w: Any) -> QuantWeight:
    """Accepts a QuantWeight, a (ggml_type, parts) tuple, a GGUFReader tensor, or an object
    with a `ggml_type` (str or enum) and q4_1_parts()/q8_0_parts() (Q4_1/Q8_0) or
    dequantize() (any other type), like model.quant_tensor.QuantTensor."""
    if isinstance(w, QuantWeight):
        return w
    if isinstance(w, tuple) and len(w) == 2 and isinstance(w[0], str):
        return QuantWeight.from_parts(w[0], tuple(w[1]))
    if hasattr(w, "tensor_type") and hasattr(w, "data"):
        return from_gguf_tensor(w)
    kind = getattr(w, "ggml_type", None)
    kind = getattr(kind, "name", kind)
    if kind == "Q4_1":
        return QuantWeight.from_parts("Q4_1", tuple(w.q4_1_parts()))
    if kind == "Q8_0":
        return QuantWeight.from_parts("Q8_0", tuple(w.q8_0_parts()))
    if isinstance(kind, str) and hasattr(w, "dequantize"):
        dense = w.dequantize()
        dense = dense.float().numpy() if isinstance(dense, torch.Tensor) else dense
        return QuantWeight.from_parts(kind, (dense,))
    raise ModelLoadError(f"cannot build a linear from {type(w).__name__} of type {kind!r}; "
                         f"pass a QuantWeight or (ggml_type, parts)")


def mode_for(ggml_type: str, mode: str) -> str:
    """The concrete mode a weight of this type gets when `mode` is asked for.

    "auto": Q4_1 -> int4 (fastest at every batch size measured, 4.5 bits); F32/F16 ->
    float32 (exact); anything else, Q8_0 included -> bfloat16 (int8 re-quantization loses
    ~1.3%, float16 is slow past one token, float32 is 2-3x slower at one token). The LM head
    of a Q8_0 table takes q8_0 instead (`head_mode`). int4 and q8_0 asked of another type
    give its "auto" form.
    """
    if mode not in MODES:
        raise ConfigError(f"linear mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if (mode == "auto" or (mode == "int4" and ggml_type != "Q4_1")
            or (mode == "q8_0" and ggml_type != "Q8_0")):
        if ggml_type == "Q4_1":
            return "int4"
        return "float32" if ggml_type in ("F32", "F16") else "bfloat16"
    return mode


def head_mode(ggml_type: str, mode: str) -> str:
    """The LM head's mode: as `mode_for`, but "auto" keeps a Q8_0 table as Q8_0 blocks (q8_0:
    30 MB instead of 54 MB for SmolLM2's, exact weights, and a streamed chunk needs no
    expansion: 0.12 ms per 1792-row chunk landed in a slot, against 0.41 ms to expand it and
    multiply in bfloat16, at one token; see `make_lm_head` for the whole head)."""
    return "q8_0" if mode == "auto" and ggml_type == "Q8_0" else mode_for(ggml_type, mode)


def _bf16_ceil(s: torch.Tensor) -> torch.Tensor:
    """Row scales (float32, >= 0) rounded up to bfloat16 (the kernel's scale dtype), zeros
    made 1, so that no re-quantized code exceeds 127."""
    s = torch.where(s > 0, s, torch.ones_like(s))
    b = s.bfloat16()
    bits = b.view(torch.int16)
    bits += (b.float() < s).to(torch.int16)  # positive bf16: next code up is next value up
    return b.contiguous()


def int4pack_scales_zeros(d: np.ndarray, m: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Q4_1 (d, m) [out, in/32] as the int4 kernel's scales_and_zeros [in/32, out, 2]:
    (q - 8) * d + (m + 8 d) == d q + m."""
    s = torch.from_numpy(_f32(d)).T
    z = torch.from_numpy(_f32(m + 8.0 * d)).T
    return torch.stack([s, z], dim=-1).to(dtype).contiguous()


class QuantLinear:
    """y = x @ W^T for x [..., in] float32 -> float32 [..., out]; W is the parts fused along out.

    Attributes (fixed after construction):
        mode: the concrete mode (never "auto").
        in_features, out_features: W's shape; out_features == sum(out_splits).
        out_splits: out size of each fused part, in order (for `y.split(out_splits, -1)`).
        weight, scales: the tensors held: float/int8/int4-packed weight, or the Q8_0 blocks
            (uint8, flat, row-major); int8 row scales or int4 scales_and_zeros (None for
            float and q8_0 modes).
    """

    def __init__(self, parts: list[QuantWeight], mode: str) -> None:
        assert mode in MODES and mode != "auto"
        self.mode = mode
        self.in_features = parts[0].in_features
        self.out_splits = tuple(p.out_features for p in parts)
        self.out_features = sum(self.out_splits)
        self.scales: torch.Tensor | None = None
        if mode == "int4":
            self._init_int4(parts)
        elif mode == "q8_0":
            assert all(p.ggml_type == "Q8_0" for p in parts), "q8_0 mode holds Q8_0 weights only"
            self.weight = torch.cat([p.blocks() for p in parts])
        elif mode == "int8":
            w = np.concatenate([p.dequantize() for p in parts]).astype(np.float64)
            s = _bf16_ceil(torch.from_numpy(np.abs(w).max(axis=1) / 127.0).float())
            q = np.clip(np.rint(w / s.double().numpy()[:, None]), -127, 127)
            self.weight = torch.from_numpy(q.astype(np.int8))
            self.scales = s
        else:
            w = np.concatenate([p.dequantize() for p in parts])
            self.weight = torch.from_numpy(np.ascontiguousarray(w)).to(_DENSE[mode]).contiguous()

    def _init_int4(self, parts: list[QuantWeight]) -> None:
        q = np.concatenate([p.q for p in parts])
        d = np.concatenate([p.d for p in parts])
        m = np.concatenate([p.m for p in parts])
        pad = -self.out_features % 16  # the kernel takes out in blocks of 16: zero rows fill
        if pad:
            q = np.concatenate([q, np.full((pad, q.shape[1]), 8, np.uint8)])
            d = np.concatenate([d, np.zeros((pad, d.shape[1]), np.float32)])
            m = np.concatenate([m, np.zeros((pad, m.shape[1]), np.float32)])
        codes = torch.from_numpy(np.ascontiguousarray(q)).to(torch.int32)
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        self.scales = int4pack_scales_zeros(d, m, torch.bfloat16)

    def parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(meta, tensors) from which `from_parts` rebuilds this linear exactly: the meta is
        JSON-able, the tensors are the ones the matmul reads (so a weight file can hold them
        in the form the forward uses)."""
        meta = {"mode": self.mode, "in_features": self.in_features, "out_splits": list(self.out_splits)}
        held = {"weight": self.weight}
        if self.scales is not None:
            held["scales"] = self.scales
        return meta, held

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> QuantLinear:
        """The linear `parts()` described, over the given tensors (views are kept, not copied)."""
        self = cls.__new__(cls)
        self.mode = meta["mode"]
        self.in_features = int(meta["in_features"])
        self.out_splits = tuple(int(n) for n in meta["out_splits"])
        self.out_features = sum(self.out_splits)
        self.weight = tensors["weight"]
        self.scales = tensors.get("scales")
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this linear holds."""
        held = [self.weight] + ([self.scales] if self.scales is not None else [])
        return sum(t.untyped_storage().nbytes() for t in held)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, this linear takes {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.weight, GROUP, self.scales)
            if y.shape[1] != self.out_features:
                y = y[:, :self.out_features]
        elif self.mode == "q8_0":
            y = q8_0_linear.q8_0_linear(x2.float().contiguous(), self.weight, self.out_features)
        elif self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(),
                                                   self.weight, self.scales)
        else:
            y = F.linear(x2.to(self.weight.dtype), self.weight)
        return y.float().reshape(*lead, self.out_features)

    def __repr__(self) -> str:
        return (f"QuantLinear(mode={self.mode}, in={self.in_features}, "
                f"out={self.out_splits}, nbytes={self.nbytes})")


def make_linear(parts: list[Any], *, mode: str = "auto") -> QuantLinear:
    """One linear for the given weights fused along out (QKV, gate+up), in order.

    Each part is anything `as_quant_weight` takes, e.g. ("Q4_1", qt.q4_1_parts()). Parts
    whose concrete modes differ (mixed GGUF types) are fused in bfloat16.
    """
    if not parts:
        raise ValueError("make_linear needs at least one weight")
    qws = [as_quant_weight(p) for p in parts]
    if len({q.in_features for q in qws}) != 1:
        raise ModelLoadError(f"fused weights differ in in_features: {[q.shape for q in qws]}")
    modes = {mode_for(q.ggml_type, mode) for q in qws}
    return QuantLinear(qws, modes.pop() if len(modes) == 1 else "bfloat16")


def _make_head(qw: QuantWeight, mode: str) -> QuantLinear:
    return QuantLinear([qw], head_mode(qw.ggml_type, mode))


def lm_head_chunk_rows(vocab_size: int, hidden_size: int, layer_bytes: int) -> int:
    """Vocabulary rows per LM-head chunk: about one layer's bytes at 2 bytes per weight, a
    multiple of 256 rows. A function of the model's shape only, so every engine of a model
    (resident or streaming) splits the head alike. A chunk of a Q8_0 head (q8_0 mode) is about
    half that in memory, 8.5 bits a weight."""
    rows = max(256, (layer_bytes // (2 * hidden_size)) // 256 * 256)
    return min(rows, -(-vocab_size // 256) * 256)


def make_lm_head(weight: Any, *, mode: str = "auto") -> QuantLinear:
    """logits = x @ E^T for the (possibly tied) output matrix E [vocab, hidden].

    For SmolLM2's Q8_0 49152x576 table "auto" gives q8_0 (`head_mode`): on one thread (best
    of 30, load 5-6 on 2 cores) 2.4 ms at one token, 3.9 ms at 4, 10.6 ms at 16, against
    bfloat16's 5.3 / 7.8 / 8.1 ms (oneDNN, AMX); an earlier measurement of bfloat16 gave 3 ms
    cold at one token and 4-6 ms at 16-32 (float32 7 ms / 14-22 ms; float16 1.3 ms at one
    token but 10x slower at 8+; int8 as fast as bfloat16 but 1.3% off).
    """
    return _make_head(as_quant_weight(weight), mode)


def make_lm_head_chunks(weight: Any, *, chunk_rows: int, mode: str = "auto") -> list[QuantLinear]:
    """The head as linears over consecutive row chunks of E (`lm_head_chunk_rows`), so it can
    stream from flash in pieces the size of a layer; `lm_head_logits` runs them."""
    qw = as_quant_weight(weight)
    vocab = qw.out_features
    return [_make_head(qw.rows(a, min(a + chunk_rows, vocab)), mode)
            for a in range(0, vocab, chunk_rows)]


def lm_head_logits(hidden: torch.Tensor, chunks) -> torch.Tensor:
    """Float32 logits [N, vocab] from the head's chunk linears (an iterable, so a streaming
    pool can hand each chunk over as it arrives)."""
    return torch.cat([chunk(hidden) for chunk in chunks], dim=-1)


class QuantEmbedding:
    """Token ids [T] -> float32 rows [T, hidden], dequantizing only the rows looked up.

    Attributes (fixed): ggml_type; q, d, m as in QuantWeight, as torch tensors (d, m None for
    float tables); num_embeddings, embedding_dim. Output is bit-identical to the rows of
    gguf.quants.dequantize.
    """

    def __init__(self, weight: Any) -> None:
        qw = as_quant_weight(weight)
        self.ggml_type = qw.ggml_type
        self.num_embeddings, self.embedding_dim = qw.shape
        self.q = torch.from_numpy(np.require(qw.q, requirements=["C", "W"]))
        self.d = None if qw.d is None else torch.from_numpy(qw.d)
        self.m = None if qw.m is None else torch.from_numpy(qw.m)

    def row_parts(self) -> list[torch.Tensor]:
        """The per-row tensors (q, then d and m where present), each [num_embeddings, ...]:
        a row's record in a weight file is its slice of each, in this order."""
        return [t for t in (self.q, self.d, self.m) if t is not None]

    @classmethod
    def from_row_parts(cls, ggml_type: str, parts: list[torch.Tensor]) -> QuantEmbedding:
        """An embedding over the given rows' parts (as `row_parts()` lists them)."""
        self = cls.__new__(cls)
        self.ggml_type = ggml_type
        self.q = parts[0]
        self.d = parts[1] if len(parts) > 1 else None
        self.m = parts[2] if len(parts) > 2 else None
        self.num_embeddings, self.embedding_dim = self.q.shape
        return self

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = token_ids.reshape(-1).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ValueError(f"token id out of range 0..{self.num_embeddings - 1}")
        rows = self.q.index_select(0, ids).float()
        if self.d is not None:
            g = rows.view(len(ids), -1, GROUP)
            if self.m is None:
                g = g * self.d.index_select(0, ids)[..., None]
            else:
                g = g * self.d.index_select(0, ids)[..., None] + self.m.index_select(0, ids)[..., None]
            rows = g.reshape(len(ids), self.embedding_dim)
        return rows.reshape(*token_ids.shape, self.embedding_dim)


def make_embedding(weight: Any) -> QuantEmbedding:
    return QuantEmbedding(weight)
