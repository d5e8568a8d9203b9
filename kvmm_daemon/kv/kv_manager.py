"""KVCacheManager: per-sequence block tables over a BlockPool, with prefix hits and CoW.

A sequence's KV lives in the blocks of its table: token at position p sits in slot
`table[p // block_size] * block_size + p % block_size` of the arena. The manager:
* `allocate` admits a sequence: it reuses the longest cached run of full prompt blocks
  (never the whole prompt: the last token is always recomputed to get its logits), touches
  those hits and allocates fresh blocks for the rest of the prompt;
* `append_slots` reserves slots for tokens about to be written (a decode token, k tokens, a
  session's next turn), allocating a block when the last is full and copying a shared last
  block on write (the copy is queued for the runner: `take_pending_copies`);
* `commit` records that the runner wrote KV for the next tokens; only then are blocks that
  became full hashed and registered in the prefix cache, because a hash promises content
  that other sequences will read without recomputing it;
* `fork` shares every block with a new sequence (parallel sampling, beams);
* `free` releases a table tail first, so the longest prefixes are evicted first.
Every call that needs blocks returns None when the pool is short and changes nothing; the
scheduler decides whom to preempt. Prior art: vLLM v1 `KVCacheManager` /
`SingleTypeKVCacheManager` (allocate_slots returns None; null block; caching on
schedule), nano-vllm `BlockManager` (may_append hashes when a block fills). Left out: sliding
windows and hybrid KV groups, lookahead slots, swapping (the swap tier builds on `free`,
`block_hashes` and the pool's on_evict hook).
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from kvmm_daemon.kv.block_hash import hash_block
from kvmm_daemon.kv.block_pool import BlockPool, BlockPoolStats

SeqId = Hashable


@dataclass(frozen=True, slots=True)
class AllocResult:
    num_cached_tokens: int         # leading prompt tokens whose KV came from the prefix cache
    block_table: tuple[int, ...]   # block ids covering the whole prompt


@dataclass(frozen=True, slots=True)
class KVManagerStats:
    pool: BlockPoolStats
    num_seqs: int
    pending_copies: int


@dataclass(slots=True)
class _SeqKV:
    """One sequence's KV bookkeeping.

    Invariants (block_size = bs):
      len(block_ids) == ceil(len(token_ids) / bs): exactly the blocks the reserved tokens need.
      token_ids      every token with a reserved slot, written or about to be.
      num_computed   leading tokens whose KV is written; 0 <= num_computed <= len(token_ids).
      block_hashes   chained hashes of the first num_computed // bs blocks (each block either
                     registered in the pool under that hash, or a duplicate left uncached).
      root           the parent hash of block 0 (the tenant's root, kv/tenant.py), or None.
    """

    block_ids: list[int]
    token_ids: list[int]
    num_computed: int
    block_hashes: list[bytes]
    root: bytes | None = None


class KVCacheManager:
    """Block tables of all live sequences over one pool.

    Attributes and invariants:
      pool        the BlockPool; every block's ref_cnt equals the number of table entries
                  (over all sequences) that name it plus its pins in `_pinned`.
      block_size  tokens per block (> 0).
      model_id    mixed into every block hash so that prefixes of different models never
                  match.
      _seqs       seq_id -> _SeqKV for every allocated, not yet freed sequence.
      _pending    (src, dst) block copies recorded by copy-on-write and not yet taken by the
                  runner; each dst is in some table, and pairs must be applied in order
                  before any KV of this step is written.
      _pinned     block id -> number of pending copies reading it. A copy keeps the
                  reference its sequence gave up on src until the copy is taken, so src
                  cannot be reused (and overwritten, e.g. by a swap-in) before it is read.
                  "Shared" means ref_cnt minus pins > 1.
    """

    def __init__(self, pool: BlockPool, block_size: int, model_id: str) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.pool = pool
        self.block_size = block_size
        self.model_id = model_id
        self._seqs: dict[SeqId, _SeqKV] = {}
        self._pending: list[tuple[int, int]] = []
        self._pinned: dict[int, int] = {}

    # --- queries -------------------------------------------------------------------------

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def _seq(self, seq_id: SeqId) -> _SeqKV:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_table(self, seq_id: SeqId) -> list[int]:
        """A copy of the sequence's block ids, in token order."""
        return list(self._seq(seq_id).block_ids)

    def num_computed_tokens(self, seq_id: SeqId) -> int:
        """Leading tokens whose KV is written (cached prefix plus commits)."""
        return self._seq(seq_id).num_computed

    def num_tokens(self, seq_id: SeqId) -> int:
        """Tokens with a reserved slot (computed plus pending)."""
        return len(self._seq(seq_id).token_ids)

    def root_hash(self, seq_id: SeqId) -> bytes | None:
        """The parent hash of the sequence's first block (its tenant's root)."""
        return self._seq(seq_id).root

    def block_hashes(self, seq_id: SeqId) -> list[bytes]:
        """Chained hashes of the sequence's full, written blocks (a copy)."""
        return list(self._seq(seq_id).block_hashes)

    def slot(self, seq_id: SeqId, position: int) -> int:
        """The arena slot of token `position` (0 <= position < num_tokens)."""
        s = self._seq(seq_id)
        if not 0 <= position < len(s.token_ids):
            raise IndexError(f"position {position} outside 0..{len(s.token_ids) - 1} "
                             f"of {seq_id!r}")
        return s.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def slot_mapping(self, seq_id: SeqId, start: int, end: int) -> list[int]:
        """Slots of tokens start..end-1 (e.g. the uncached part of a prompt, or a chunk)."""
        s = self._seq(seq_id)
        if not 0 <= start <= end <= len(s.token_ids):
            raise IndexError(f"slots {start}..{end} outside 0..{len(s.token_ids)} of {seq_id!r}")
        bs, ids = self.block_size, s.block_ids
        return [ids[p // bs] * bs + p % bs for p in range(start, end)]

    def can_allocate(self, num_tokens: int) -> bool:
        """Cheap, conservative: True if a prompt of `num_tokens` surely fits now (prefix hits
        only lower the need). `allocate` may still succeed when this says False."""
        return self._blocks_for(num_tokens) <= self.pool.num_free_blocks

    def can_append(self, seq_id: SeqId, num_new_tokens: int) -> bool:
        """True iff `append_slots` with that many tokens would succeed now."""
        return self._append_need(self._seq(seq_id), num_new_tokens) <= self.pool.num_free_blocks

    def _append_need(self, s: _SeqKV, k: int) -> int:
        n0 = len(s.token_ids)
        need = self._blocks_for(n0 + k) - len(s.block_ids)
        if k > 0 and self._last_is_shared_partial(s):
            need += 1
        return need

    def _last_is_shared_partial(self, s: _SeqKV) -> bool:
        if len(s.token_ids) % self.block_size == 0:
            return False
        last = s.block_ids[-1]
        return self.pool.blocks[last].ref_cnt - self._pinned.get(last, 0) > 1

    # --- actions -------------------------------------------------------------------------

    def allocate(self, seq_id: SeqId, token_ids: Sequence[int],
                 root: bytes | None = None) -> AllocResult | None:
        """Admit a new sequence with its prompt; None (nothing changed) when short of blocks.
        Its hash chain starts from `root` (the tenant's, kv/tenant.py): only sequences with
        the same root share cached blocks."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has KV blocks; free it first")
        if len(token_ids) == 0:
            raise ValueError(f"sequence {seq_id!r} has an empty prompt")
        bs = self.block_size
        tokens = list(token_ids)
        max_hits = (len(tokens) - 1) // bs          # keep at least the last token to compute
        hits, hashes = [], []
        parent = root
        for i in range(max_hits):
            parent = hash_block(parent, tokens[i * bs:(i + 1) * bs], self.model_id)
            block = self.pool.get_cached_block(parent)
            if block is None:
                break
            hits.append(block)
            hashes.append(parent)
        num_new = self._blocks_for(len(tokens)) - len(hits)
        revived = sum(1 for b in hits if b.ref_cnt == 0)   # hits that leave the free queue
        if num_new + revived > self.pool.num_free_blocks:
            return None
        self.pool.touch(hits)                        # before allocating: hits must not be evicted
        new = self.pool.get_new_blocks(num_new)
        assert new is not None
        self.pool.record_prefix_lookup(max_hits, len(hits))
        s = _SeqKV(block_ids=[b.block_id for b in hits + new], token_ids=tokens,
                   num_computed=len(hits) * bs, block_hashes=hashes, root=root)
        self._seqs[seq_id] = s
        return AllocResult(num_cached_tokens=s.num_computed, block_table=tuple(s.block_ids))

    def append_slots(self, seq_id: SeqId, new_token_ids: Sequence[int]) -> list[int] | None:
        """Reserve slots for tokens appended after the reserved ones and return them; None
        (nothing changed) when short of blocks. A shared, partly filled last block is
        replaced by a private copy first (see `take_pending_copies`)."""
        s = self._seq(seq_id)
        k = len(new_token_ids)
        if k == 0:
            return []
        if self._append_need(s, k) > self.pool.num_free_blocks:
            return None
        if self._last_is_shared_partial(s):
            src = s.block_ids[-1]
            got = self.pool.get_new_blocks(1)
            assert got is not None
            s.block_ids[-1] = got[0].block_id     # our reference on src becomes a pin
            self._pinned[src] = self._pinned.get(src, 0) + 1
            self._pending.append((src, got[0].block_id))
        n0 = len(s.token_ids)
        new = self.pool.get_new_blocks(self._blocks_for(n0 + k) - len(s.block_ids))
        assert new is not None
        s.block_ids.extend(b.block_id for b in new)
        s.token_ids.extend(new_token_ids)
        return self.slot_mapping(seq_id, n0, n0 + k)

    def commit(self, seq_id: SeqId, num_tokens: int) -> None:
        """Record that KV for the next `num_tokens` reserved tokens is written; blocks that
        became full are hashed and offered to the prefix cache."""
        s = self._seq(seq_id)
        if num_tokens < 0 or s.num_computed + num_tokens > len(s.token_ids):
            raise ValueError(f"commit of {num_tokens} tokens for {seq_id!r}: only "
                             f"{len(s.token_ids) - s.num_computed} reserved tokens are unwritten")
        s.num_computed += num_tokens
        bs = self.block_size
        for i in range(len(s.block_hashes), s.num_computed // bs):
            parent = s.block_hashes[-1] if s.block_hashes else s.root
            h = hash_block(parent, s.token_ids[i * bs:(i + 1) * bs], self.model_id)
            s.block_hashes.append(h)
            block = self.pool.blocks[s.block_ids[i]]
            assert block.block_hash is None, f"block {block.block_id} hashed twice"
            self.pool.cache_full_block(block, h)

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """Make `child_id` share every block of `parent_id`; the first of them to write into
        the shared last block copies it."""
        p = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already has KV blocks; free it first")
        if p.num_computed != len(p.token_ids):
            raise ValueError(f"fork of {parent_id!r} with {len(p.token_ids) - p.num_computed} "
                             "uncommitted tokens; commit them before forking")
        self.pool.touch(self.pool.blocks[i] for i in p.block_ids)
        self._seqs[child_id] = _SeqKV(block_ids=list(p.block_ids), token_ids=list(p.token_ids),
                                      num_computed=p.num_computed,
                                      block_hashes=list(p.block_hashes), root=p.root)

    def free(self, seq_id: SeqId) -> None:
        """Release the sequence's blocks, tail first; full hashed blocks stay cached."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        self.pool.free_blocks(self.pool.blocks[i] for i in reversed(s.block_ids))
        if self._pending:   # a copy into a block nobody holds any more must not run
            dead = [(src, dst) for src, dst in self._pending
                    if self.pool.blocks[dst].ref_cnt == 0]
            if dead:
                self._pending = [pair for pair in self._pending if pair not in dead]
                self._unpin(src for src, _ in dead)

    def _unpin(self, srcs: Iterable[int]) -> None:
        blocks = []
        for src in srcs:
            left = self._pinned[src] - 1
            if left:
                self._pinned[src] = left
            else:
                del self._pinned[src]
            blocks.append(self.pool.blocks[src])
        self.pool.free_blocks(blocks)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies to apply, in order, before writing this step's KV.
        Call it right before the copies run: it releases the sources' pins, so a source
        nobody else holds becomes free again."""
        out, self._pending = self._pending, []
        self._unpin(src for src, _ in out)
        return out

    def pinned_blocks(self) -> dict[int, int]:
        """Block id -> pending copies reading it (a copy); for tests and debugging."""
        return dict(self._pinned)

    def statistics(self) -> KVManagerStats:
        return KVManagerStats(pool=self.pool.statistics(), num_seqs=len(self._seqs),
                              pending_copies=len(self._pending))
