"""Forging session exports as a hostile user would: any header, token ids and KV bytes,
with the checksums the format asks for computed correctly (they prove nothing)."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np

from swapfs import checksum

ALIGN = 4096


def _pad(b: bytes) -> bytes:
    return b.ljust(-(-len(b) // ALIGN) * ALIGN, b"\0")


def honest_meta(layout, token_ids, num_kv_tokens: int, algorithm: str = "crc32") -> dict:
    return {"format": 1, "layout": json.loads(layout.to_json()), "layout_id": layout.layout_id,
            "session_id": "x", "owner_uid": 0, "created": 1.0, "num_tokens": len(token_ids),
            "num_kv_tokens": num_kv_tokens, "num_blocks": layout.blocks_for(num_kv_tokens),
            "block_bytes": layout.block_bytes, "checksum": algorithm, "block_checksums": []}


def finite_block(layout, seed: int = 0) -> bytes:
    n = layout.block_bytes // 4
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32).tobytes()


def forge(meta: dict, token_ids, blocks: list[bytes]) -> bytes:
    """An export file of `meta` (block_checksums filled in unless given), tokens, blocks."""
    algo = meta.get("checksum")
    fn = checksum.get(algo if algo in ("crc32", "crc32c", "xxh3_64") else "crc32")
    if not meta.get("block_checksums"):
        meta = dict(meta, block_checksums=[f"{fn(np.frombuffer(b, np.uint8)):016x}" for b in blocks])
    text = json.dumps(meta).encode()
    head = struct.pack("<8sII", b"KVMMSES1", len(text), zlib.crc32(text)) + text
    tokens = np.asarray(token_ids, dtype="<i4").tobytes()
    return _pad(head) + _pad(tokens) + b"".join(blocks)
