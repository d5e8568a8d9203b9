"""Minimal GGUF container parser: metadata, tensor directory and zero-copy tensor bytes.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor_count,
u64 kv_count, kv_count x (string key, u32 value type, value), tensor_count x (string name,
u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type, u64 offset), padding to
`general.alignment` (default 32), then the tensor data. Strings are u64 length + UTF-8.

The `gguf` package's GGUFReader wraps every array element in numpy views and takes ~2 s on
a 49k-token vocabulary; this reader walks the header once with struct and takes ~0.1 s.
The type codes and block sizes still come from the `gguf` package. Left out: big-endian
files and GGUF v1.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from kvmm_daemon.errors import ModelLoadError

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One entry of the tensor directory.

    dims are GGUF order (innermost first); data_offset is absolute in the file.
    """

    name: str
    dims: tuple[int, ...]
    ggml_type: str
    data_offset: int


class GGUFContainer:
    """A parsed GGUF file.

    Attributes: path; version; metadata (key -> plain Python value: int, float, bool, str
    or list); tensors (name -> TensorInfo, file order); header_size (bytes before the
    first tensor's data: magic, metadata and tensor directory, padded). The file stays
    mapped read-only for the life of the object; `buffer` is that mapping.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            try:
                self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                raise ModelLoadError(f"{path} is empty, not a GGUF model file; pass --model "
                                     "PATH to a GGUF file or a safetensors directory") from None
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, ValueError, OverflowError):
            raise ModelLoadError(f"{path} is truncated or corrupt (the GGUF header cannot "
                                 "be parsed); download the model file again") from None

    def _parse(self) -> None:
        buf = self.buffer
        if buf[:4] != b"GGUF":
            raise ModelLoadError(f"{self.path} is not a GGUF file (no GGUF magic); pass "
                                 "--model PATH to a GGUF file or a safetensors directory")
        self._pos = 4
        version = self._read("<I")
        if version not in (2, 3):
            hint = "big-endian GGUF" if version in (2 << 24, 3 << 24) else f"version {version}"
            raise ModelLoadError(f"{self.path}: {hint} files are not supported (kvmm reads "
                                 "little-endian GGUF v2/v3); re-convert the model")
        self.version = version
        n_tensors = self._read("<Q")
        n_kv = self._read("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._read("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._pos)
            self._pos += 8 * n_dims
            type_code = self._read("<I")
            offset = self._read("<Q")
            try:
                type_name = GGMLQuantizationType(type_code).name
            except ValueError:
                type_name = f"unknown type {type_code}"
            infos.append((name, tuple(int(d) for d in dims), type_name, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("bad alignment")
        self.header_size = -(-self._pos // alignment) * alignment
        self.tensors = {name: TensorInfo(name, dims, t, self.header_size + off)
                        for name, dims, t, off in infos}

    def _read(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        start = self._pos
        self._pos += n
        if self._pos > len(self.buffer):
            raise IndexError("string past end of file")
        return self.buffer[start:self._pos].decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self._read("<I"))
            count = self._read("<Q")
            if item_type in _SCALARS and item_type != GGUFValueType.BOOL:
                dtype = np.dtype(_SCALARS[item_type])
                values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self._pos)
                self._pos += dtype.itemsize * count
                return values.tolist()
            return [self._value(item_type) for _ in range(count)]
        return self._read(_SCALARS[vtype])

    def tensor_bytes(self, info: TensorInfo, nbytes: int) -> np.ndarray:
        """Read-only uint8 view of a tensor's `nbytes` data bytes (no copy)."""
        if info.data_offset + nbytes > len(self.buffer):
            raise ModelLoadError(f"{self.path} is truncated: tensor {info.name!r} ends past "
                                 "the end of the file; download the model file again")
        return np.frombuffer(self.buffer, dtype=np.uint8, count=nbytes, offset=info.data_offset)
