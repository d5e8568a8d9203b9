"""KVBlock: the bookkeeping record of one physical KV block.

A block holds the K and V of `block_size` consecutive tokens of one sequence across all
layers; its bytes live in the arena (`kv_cache.KVCache`) at index `block_id`. This record
only says who uses it and whether its content is a reusable prefix. Prior art: vLLM v1
`KVCacheBlock` (kv_cache_utils.py), nano-vllm `Block`. Left out: the token ids themselves
(the chained hash identifies the content) and any per-owner tag (the manager knows owners).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class KVBlock:
    """One physical block.

    Attributes and invariants (kept by `BlockPool`):
      block_id   index into the pool's `blocks` list and into the arena; never changes.
      ref_cnt    number of block-table entries that point at this block (a block shared by a
                 fork or a prefix hit counts each table). ref_cnt == 0 iff the block is in
                 the free queue.
      block_hash the chained prefix hash of the block's full, written content, or None.
                 Not None iff the pool's hash map maps that hash to this very block; a block
                 whose content duplicates an already cached block keeps None.
                 A ref_cnt-0 block with a hash is CACHED (evictable, still findable);
                 a ref_cnt-0 block without one is FREE.
      prev, next links of the intrusive free queue; both None iff the block is not queued
                 (the queue's sentinels make them non-None for every queued block).
    Identity, not value, is equality: two blocks are the same only if they are one object.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    prev: KVBlock | None = field(default=None, repr=False)
    next: KVBlock | None = field(default=None, repr=False)

    @property
    def is_queued(self) -> bool:
        """True while the block sits in a free queue."""
        return self.prev is not None

    @property
    def is_cached(self) -> bool:
        """True for a ref_cnt-0 block that still holds a findable prefix."""
        return self.ref_cnt == 0 and self.block_hash is not None
