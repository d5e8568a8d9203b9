"""FreeBlockQueue: the eviction order of ref_cnt-0 blocks, as an intrusive linked list.

Every block with ref_cnt 0 sits in this one queue; allocation takes the front. The order:

  front  [ FREE blocks (no hash), any order ] [ CACHED blocks, least recently used first ]  back

* FREE blocks (never held a hash, or a duplicate / partial block) are handed out before any
  CACHED block, so a cached prefix is evicted only when no plain free block is left. This
  holds in O(1) with one list because `append` puts a hash-less block at the FRONT and a
  cached block at the BACK, so the FREE run always precedes the CACHED run.
* Among CACHED blocks the least recently freed is evicted first (LRU: a prefix hit removes
  the block; freeing it again puts it at the back).
* A sequence frees its blocks tail first (the manager passes them in reverse), so its
  longest prefixes become evictable before its head: the head block is shared by the most
  prompts and is the last to go.

Prior art: vLLM v1 `FreeKVCacheBlockQueue` (kv_cache_utils.py) keeps one LRU list and
appends every freed block at the back; nano-vllm uses a deque of ids with O(n) removal.
The links live in the blocks themselves (`KVBlock.prev/next`), so `remove` on a prefix hit
is O(1) and nothing is allocated. Left out: locking (the engine mutates from one thread).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kvmm_daemon.kv.block import KVBlock


@dataclass(frozen=True, slots=True)
class FreeQueueStats:
    num_queued: int   # all ref_cnt-0 blocks
    num_cached: int   # of those, holding a hash (evictable prefixes)


class FreeBlockQueue:
    """Doubly linked list of ref_cnt-0 blocks between two sentinels.

    Attributes and invariants:
      _head, _tail  sentinels (block_id -1); _head.next is the next block handed out,
                    _tail.prev the most recently freed cached block. Never handed out.
      _len          number of real blocks between the sentinels.
      _num_cached   how many of them hold a hash; the first _len - _num_cached blocks from
                    the front have no hash and the rest all have one.
    A queued block's `block_hash` must not change while it is queued (the pool drops a
    hash only after `popleft`), so `_num_cached` stays exact.
    """

    __slots__ = ("_head", "_tail", "_len", "_num_cached")

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self._len = 0
        self._num_cached = 0
        # Start in the given order (FREE ones first): append() alone would reverse FREE blocks.
        blocks = list(blocks)
        for block in [b for b in blocks if b.block_hash is None] + [
                b for b in blocks if b.block_hash is not None]:
            self._check_insertable(block)
            self._link(block, self._tail.prev, self._tail)

    def __len__(self) -> int:
        return self._len

    @property
    def num_cached(self) -> int:
        """Queued blocks that hold a hash (CACHED); the rest are FREE."""
        return self._num_cached

    def append(self, block: KVBlock) -> None:
        """Queue a block whose ref_cnt just reached 0: FREE ones at the front (handed out
        next), CACHED ones at the back (most recently used)."""
        self._check_insertable(block)
        if block.block_hash is None:
            self._link(block, self._head, self._head.next)
        else:
            self._link(block, self._tail.prev, self._tail)

    @staticmethod
    def _check_insertable(block: KVBlock) -> None:
        assert block.ref_cnt == 0, f"queueing block {block.block_id} with ref_cnt {block.ref_cnt}"
        assert not block.is_queued, f"block {block.block_id} is already queued"

    def _link(self, block: KVBlock, before: KVBlock | None, after: KVBlock | None) -> None:
        assert before is not None and after is not None
        block.prev, block.next = before, after
        before.next = block
        after.prev = block
        self._len += 1
        if block.block_hash is not None:
            self._num_cached += 1

    def popleft(self) -> KVBlock:
        """Take the front block: a FREE one if any is left, else the LRU CACHED one.
        Raises IndexError when empty (callers check `len` first)."""
        block = self._head.next
        assert block is not None
        if block is self._tail:
            raise IndexError("pop from an empty free block queue")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        """Unlink a queued block in O(1) (a prefix hit on a CACHED block)."""
        prev, nxt = block.prev, block.next
        assert prev is not None and nxt is not None, f"block {block.block_id} is not queued"
        prev.next = nxt
        nxt.prev = prev
        block.prev = block.next = None
        self._len -= 1
        if block.block_hash is not None:
            self._num_cached -= 1
        assert self._len >= self._num_cached >= 0

    def __iter__(self) -> Iterator[KVBlock]:
        """Front to back: the order in which blocks would be handed out."""
        block = self._head.next
        while block is not self._tail:
            assert block is not None
            nxt = block.next
            yield block
            block = nxt

    def statistics(self) -> FreeQueueStats:
        return FreeQueueStats(num_queued=self._len, num_cached=self._num_cached)
