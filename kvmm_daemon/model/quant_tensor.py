"""QuantTensor: one weight tensor as stored on disk, plus ways to read it.

A tensor keeps its storage format (GGML block quantization or a float type) and a numpy
view of its raw bytes, normally straight into the memory-mapped model file, so loading a
model copies nothing; consumers either dequantize to float32 or take the quantized parts
apart for their own packed kernels (q4_1_parts, q8_0_parts).

Block formats (ggml-common.h): Q8_0 = {f16 d; int8 qs[32]} -> x = d*q;
Q4_1 = {f16 d; f16 m; u8 qs[16]} with element j in the low nibble of qs[j] and element
j+16 in the high nibble -> x = d*q + m. Q4_0/Q5_x and the K-quants are dequantized through
`gguf.quants.dequantize`. Left out: IQ*/TQ*/MXFP4 formats and integer tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from kvmm_daemon.errors import ModelLoadError

FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES

# numpy dtype of the stored elements of the float types (BF16 kept as raw uint16)
_FLOAT_STORAGE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def check_supported_type(name: str, ggml_type: str, origin: str) -> None:
    """Raise ModelLoadError unless tensors of `ggml_type` can be read."""
    if ggml_type not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"{origin}: tensor {name!r} has type {ggml_type}, which kvmm cannot read "
            f"(supported types: {', '.join(SUPPORTED_TYPES)}); use a GGUF quantized to "
            "one of those (e.g. Q4_1 or Q8_0)")


def block_layout(ggml_type: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a storage type; (1, itemsize) for floats."""
    if ggml_type in _FLOAT_STORAGE:
        return 1, _FLOAT_STORAGE[ggml_type].itemsize
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]


def storage_nbytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this type and (torch-order) shape occupies."""
    block, size = block_layout(ggml_type)
    n = int(np.prod(shape, dtype=np.int64))
    assert shape and shape[-1] % block == 0, (ggml_type, shape)
    return n // block * size


@dataclass(frozen=True, slots=True, eq=False)
class QuantTensor:
    """A stored tensor.

    Attributes:
      name: GGUF tensor name (e.g. "blk.0.attn_q.weight").
      ggml_type: storage type name, one of SUPPORTED_TYPES.
      shape: torch order, [out_features, in_features] for a 2-D weight (GGUF lists the
        dims the other way round).
      data: raw storage. Float types: an array of `shape` with dtype float32/float16/uint16
        (bfloat16 bits). Block types: uint8 of shape (*shape[:-1], bytes per row). Usually
        a read-only view into the mapped file; never written.
      file_offset: absolute byte offset of `data` in its file when `data` is a view of the
        file's bytes in that order, else None (e.g. a permuted safetensors tensor).
    """

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray
    file_offset: int | None = None

    def __post_init__(self) -> None:
        assert self.ggml_type in SUPPORTED_TYPES, self.ggml_type
        assert self.data.nbytes == storage_nbytes(self.ggml_type, self.shape), (
            self.name, self.ggml_type, self.shape, self.data.shape, self.data.dtype)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def is_quantized(self) -> bool:
        return self.ggml_type in QUANT_TYPES

    def dequantize(self) -> torch.Tensor:
        """A new float32 torch tensor of `shape` with the stored values."""
        t = self.ggml_type
        if t == "F32":
            values = np.array(self.data, dtype=np.float32)
        elif t == "F16":
            values = self.data.astype(np.float32)
        elif t == "BF16":
            values = (self.data.astype(np.uint32) << 16).view(np.float32)
        elif t == "Q8_0":
            d, q = self._q8_0_arrays()
            values = q.astype(np.float32) * d[..., None]
        elif t == "Q4_1":
            d, m, q = self._q4_1_arrays()
            values = d[..., None] * q.astype(np.float32) + m[..., None]
        else:
            values = gguf_dequantize(np.asarray(self.data), GGMLQuantizationType[t])
        return torch.from_numpy(np.ascontiguousarray(values).reshape(self.shape))

    def _blocks(self, block_bytes: int) -> np.ndarray:
        rows = int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1
        return np.asarray(self.data).reshape(rows, -1, block_bytes)

    def _q8_0_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        blocks = self._blocks(34)
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[:, :, 2:].view(np.int8)
        return d, q

    def _q4_1_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        blocks = self._blocks(20)
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[:, :, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [rows, nblocks, 32]
        return d, m, q

    def q4_1_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a Q4_1 tensor [out, in]: (d [out, in/32] f32, m [out, in/32] f32,
        q [out, in] uint8 in 0..15) with weight[o, i] = d[o, i//32] * q[o, i] + m[o, i//32]."""
        self._require("Q4_1")
        d, m, q = self._q4_1_arrays()
        rows = d.shape[0]
        return (torch.from_numpy(d), torch.from_numpy(m),
                torch.from_numpy(np.ascontiguousarray(q).reshape(rows, -1)))

    def q8_0_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For a Q8_0 tensor [out, in]: (d [out, in/32] f32, q [out, in] int8) with
        weight[o, i] = d[o, i//32] * q[o, i]."""
        self._require("Q8_0")
        d, q = self._q8_0_arrays()
        rows = d.shape[0]
        return torch.from_numpy(d), torch.from_numpy(np.ascontiguousarray(q).reshape(rows, -1))

    def _require(self, ggml_type: str) -> None:
        if self.ggml_type != ggml_type:
            raise ValueError(f"tensor {self.name} is {self.ggml_type}, not {ggml_type}")
