"""Chained prefix hashes of full KV blocks: the key of the prefix cache.

A full block is identified by hash(parent block's hash, its token ids, model id), so equal
hashes mean equal whole prefixes, not just equal blocks. The hash must be the same in every
process and after a restart (swapfs keeps cached prefixes on flash under this key), so it is
SHA-256 over a canonical byte encoding, never Python's salted `hash()`:

    b"kvmm-kv-block-v1\\0"
    u32 len(model_id utf-8) | model_id utf-8
    u8 has_parent | parent digest (32 bytes, present iff has_parent)
    u32 number of tokens | each token id as u32            (all little-endian)

Prior art: vLLM v1 `hash_block_tokens` (kv_cache_utils.py, a tuple of parent hash, tokens and
extra keys through sha256/pickle), nano-vllm `compute_hash` (xxhash64). Left out: extra keys
for multi-modal input and LoRA (kvmm serves one text model per model id).
"""
from __future__ import annotations

import hashlib
import operator
import struct
from collections.abc import Sequence

DIGEST_SIZE = 32
_TAG = b"kvmm-kv-block-v1\0"


def hash_block(parent: bytes | None, token_ids: Sequence[int], model_id: str) -> bytes:
    """The 32-byte chained hash of one block whose predecessor hashes to `parent`
    (None for the first block of a sequence)."""
    if parent is not None and len(parent) != DIGEST_SIZE:
        raise ValueError(f"parent hash must be {DIGEST_SIZE} bytes, got {len(parent)}")
    model = model_id.encode("utf-8")
    try:
        tokens = struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids)
    except struct.error:
        bad = next((t for t in token_ids if not _is_u32(t)), None)
        raise ValueError(f"token id {bad!r} is not an integer in 0..2**32-1") from None
    h = hashlib.sha256(_TAG)
    h.update(struct.pack("<I", len(model)))
    h.update(model)
    if parent is None:
        h.update(b"\0")
    else:
        h.update(b"\1")
        h.update(parent)
    h.update(tokens)
    return h.digest()


def _is_u32(value: object) -> bool:
    try:
        return 0 <= operator.index(value) < 1 << 32
    except TypeError:
        return False


def hash_full_blocks(token_ids: Sequence[int], block_size: int, model_id: str,
                     parent: bytes | None = None) -> list[bytes]:
    """Chained hashes of every full block of `token_ids` (a trailing partial block has
    none); `parent` is the hash of the block before `token_ids[0]`, if any."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], model_id)
        hashes.append(parent)
    return hashes
