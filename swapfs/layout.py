"""KVLayout: what one KV block is, and the identity that makes stored blocks reusable.

A block stored on flash is only meaningful to the same model with the same KV geometry
and dtype. `KVLayout` carries those facts; its `layout_id` (a 64-bit hash of them and the
store format version) is written into every slot header, the metadata and every export
file, and a mismatch at open drops the whole store rather than serving foreign KV.

A block's bytes are `[num_layers, 2, block_size, num_kv_heads, head_dim]` in this order,
`block_bytes` long: in the engine's layer-major arena one piece per layer (its K then V),
concatenated (swapfs.block_buffer).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from swapfs.errors import SwapConfigError

FORMAT_VERSION = 1  # bump when the slot, metadata or export format changes

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1,
                "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The geometry of one KV block and the model it belongs to.

    model_id: a stable identity of the weights (e.g. the GGUF file's name, size and a hash of
      its header); two different models must never share an id.
    """

    model_id: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise SwapConfigError(f"KVLayout.{name}={value!r} must be a positive int")
        if self.dtype not in _DTYPE_BYTES:
            raise SwapConfigError(f"KVLayout.dtype={self.dtype!r} is not one of"
                                  f" {sorted(_DTYPE_BYTES)}")
        if not self.model_id:
            raise SwapConfigError("KVLayout.model_id is empty; pass the model's identity")

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers (K and V)."""
        return (self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
                * _DTYPE_BYTES[self.dtype])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> KVLayout:
        return cls(**json.loads(text))

    @property
    def layout_id(self) -> int:
        """64-bit identity of (format version, model, geometry, dtype)."""
        digest = hashlib.blake2b(f"{FORMAT_VERSION}:{self.to_json()}".encode(),
                                 digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def blocks_for(self, num_kv_tokens: int) -> int:
        """Blocks needed to hold the KV of `num_kv_tokens` tokens."""
        return -(-num_kv_tokens // self.block_size)
