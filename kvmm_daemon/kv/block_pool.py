"""BlockPool: the physical KV blocks, their free queue and the prefix-cache hash map.

Mechanism only: the pool hands out, takes back, shares and caches blocks when told to and
answers None when it is short; it never decides whom to preempt (the scheduler does) and
keeps no per-sequence state (the KV manager does). Eviction is implicit: `get_new_blocks`
takes FREE blocks first and evicts the least recently used CACHED blocks only when no FREE
block is left (order: see `free_queue`). Just before a cached block loses its hash the
`on_evict(block, hash)` hook runs, so the flash tier can save the block's bytes first.

Prior art: vLLM v1 `BlockPool` (vllm/v1/core/block_pool.py), nano-vllm `BlockManager`.
Left out: vLLM's null block (kvmm tables use -1 for "no block"), KV events, and de-duplicating
identical blocks (a block whose hash is already cached by another block stays uncached, so
block tables stay append-only).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvmm_daemon.kv.block import KVBlock
from kvmm_daemon.kv.free_queue import FreeBlockQueue

logger = logging.getLogger(__name__)

EvictHook = Callable[[KVBlock, bytes], None]


@dataclass(frozen=True, slots=True)
class BlockPoolStats:
    blocks_total: int
    blocks_allocated: int     # ref_cnt >= 1
    blocks_cached: int        # ref_cnt 0, holding a hash (evictable prefix)
    blocks_free: int          # ref_cnt 0, no hash
    prefix_queries: int       # full blocks looked up by successful allocations
    prefix_hits: int          # of those, found cached
    evictions: int            # cached blocks whose hash was dropped to reuse them
    evict_hook_errors: int    # evictions whose on_evict hook raised (block lost, not saved)


class BlockPool:
    """`num_blocks` KV blocks, referred to by id.

    Attributes and invariants:
      blocks       all blocks; blocks[i].block_id == i. Never grows or shrinks.
      on_evict     None or a callable(block, hash) run just before a cached block's hash is
                   dropped for reuse; it may read the block's bytes but must not keep the block
                   or call back into the pool (the pool reuses the block at once).
                   An exception from it is logged and counted, and the block is reused
                   anyway: losing a cached prefix only costs recompute.
      _free        holds exactly the blocks with ref_cnt 0 (FREE and CACHED).
      _cached      hash -> block; `_cached[h] is b` iff `b.block_hash == h` (ref_cnt any:
                   a cached block in use by sequences is still findable).
      counters     monotonic totals for `statistics()`.
    """

    def __init__(self, num_blocks: int, *, on_evict: EvictHook | None = None) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.blocks: list[KVBlock] = [KVBlock(i) for i in range(num_blocks)]
        self.on_evict: EvictHook | None = on_evict
        self._free = FreeBlockQueue(self.blocks)
        self._cached: dict[bytes, KVBlock] = {}
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._evictions = 0
        self._evict_hook_errors = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks `get_new_blocks` can hand out now: FREE plus evictable CACHED."""
        return len(self._free)

    def get_new_blocks(self, n: int) -> list[KVBlock] | None:
        """Take `n` blocks (ref_cnt 1, no hash), evicting cached ones as needed;
        None, with nothing changed, when fewer than `n` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            return None
        out: list[KVBlock] = []
        for _ in range(n):
            block = self._free.popleft()
            if block.block_hash is not None:
                self._evict(block)
            assert block.ref_cnt == 0 and block.block_hash is None
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        block_hash = block.block_hash
        assert block_hash is not None and self._cached.get(block_hash) is block
        if self.on_evict is not None:
            try:
                self.on_evict(block, block_hash)
            except Exception:
                self._evict_hook_errors += 1
                logger.exception("on_evict hook failed for block %d; its prefix is dropped",
                                 block.block_id)
        del self._cached[block_hash]
        block.block_hash = None
        self._evictions += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; blocks reaching ref_cnt 0 join the free queue
        in the given order, so pass them in eviction priority (first = evicted first).
        Cached ones stay findable until evicted."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free.append(block)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add one reference to each block (a prefix hit or a fork); a CACHED block leaves
        the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    raise ValueError(f"block {block.block_id} is free; allocate it, not touch it")
                self._free.remove(block)
            block.ref_cnt += 1

    def cache_full_block(self, block: KVBlock, block_hash: bytes) -> bool:
        """Register an allocated block whose KV is fully written under its chained hash.
        False (the block stays uncached) when another block already holds that hash."""
        if block.ref_cnt <= 0:
            raise ValueError(f"block {block.block_id} is not allocated; "
                             "only written blocks are cached")
        if block.block_hash is not None:
            raise ValueError(f"block {block.block_id} is already cached")
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        """The block holding `block_hash` (allocated or CACHED), or None. No side effects:
        `touch` it to use it."""
        return self._cached.get(block_hash)

    def record_prefix_lookup(self, queried: int, hit: int) -> None:
        """Count one allocation's prefix lookup (in blocks) for `statistics()`; the manager
        calls it once per successful allocation so retried admissions do not count twice."""
        assert 0 <= hit <= queried
        self._prefix_queries += queried
        self._prefix_hits += hit

    def statistics(self) -> BlockPoolStats:
        queued = len(self._free)
        cached = self._free.num_cached
        return BlockPoolStats(
            blocks_total=len(self.blocks),
            blocks_allocated=len(self.blocks) - queued,
            blocks_cached=cached,
            blocks_free=queued - cached,
            prefix_queries=self._prefix_queries,
            prefix_hits=self._prefix_hits,
            evictions=self._evictions,
            evict_hook_errors=self._evict_hook_errors,
        )

    def free_queue_order(self) -> list[int]:
        """Block ids of the free queue, front (next handed out) to back; for tests/debug."""
        return [b.block_id for b in self._free]

    def cached_items(self) -> list[tuple[bytes, KVBlock]]:
        """A snapshot of the hash map (allocated and CACHED blocks); for tests, stats and
        the flash tier's checkpoint of cached prefixes."""
        return list(self._cached.items())
