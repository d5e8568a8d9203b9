"""PrefixTier: the prefix-cache tier of a SwapSpace.

Blocks of complete prefixes, keyed by the engine's chained block hash, stored durably and
found again across requests, clients and restarts. The tier is a cache: least recently
used blocks are evicted when any allocation finds no free slot (`evict`, called by the
space), a lookup stops at the first miss (a chain is only useful up to its first hole), and
a corrupt or unreadable block is a miss (counted in the statistics, corrupt entries
dropped) rather than an exception. Recency is kept in memory and persisted lazily with the
next prefix commit or at close.

A part of SwapSpace, composed rather than mixed in: it owns the hash index below and uses
the space's lock, metadata, SlotMap and slot I/O (`_views`, `_allocate`, `_begin_write`,
`_end_write`, `read_refs`, `_commit`, `_record`).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from swapfs.errors import SlotCorruptError, SwapError, SwapNotFoundError
from swapfs.metadata import SlotRecord
from swapfs.pending_commit import PendingCommit
from swapfs.records import PrefixInfo, Snapshot

if TYPE_CHECKING:
    from swapfs.swap_space import SwapSpace


class PrefixTier:
    """Attributes (guarded by the space's `_lock`):
      _lru: hash -> slot_id, least recently used first; every slot in it is of kind
        "prefix" in the SlotMap, and every "prefix" slot is in it.
      _times: hash -> (created, last_used), for exactly the hashes of `_lru`.
      _touched: hashes whose last_used is not yet persisted (flushed with the next prefix
        commit and at close).
      _pending: hashes being written by some put (skipped by other puts until its finish).
      hits, misses: blocks found / not found by `get`; evictions: blocks `evict` dropped.
    """

    def __init__(self, space: SwapSpace) -> None:
        self._space = space
        self._lock = space._lock
        self._meta = space._meta
        self._slots = space._slots
        self._lru: OrderedDict[bytes, int] = OrderedDict()
        self._times: dict[bytes, tuple[float, float]] = {}
        for h, slot, created, last_used in self._meta.prefixes():
            self._lru[h] = slot
            self._times[h] = (created, last_used)
        self._touched: set[bytes] = set()
        self._pending: set[bytes] = set()
        self.hits = self.misses = self.evictions = 0

    # -- eviction and dropping (callers hold the lock) --------------------------------------

    def evict(self, n: int) -> None:
        """Drop up to `n` least recently used unpinned blocks, to free their slots."""
        victims = []
        for h, slot in self._lru.items():
            if len(victims) == n:
                break
            if not self._slots.is_pinned(slot):
                victims.append((h, slot))
        if victims:
            self._drop(victims)
            self.evictions += len(victims)

    def _drop(self, victims: Sequence[tuple[bytes, int]]) -> None:
        self._meta.commit_prefixes([], victims, [])
        self._forget(victims)

    def _forget(self, victims: Sequence[tuple[bytes, int]]) -> None:
        for h, _slot in victims:
            del self._lru[h]
            del self._times[h]
            self._touched.discard(h)
        self._slots.release([slot for _h, slot in victims])

    def _touch(self, h: bytes, now: float) -> None:
        self._lru.move_to_end(h)
        self._times[h] = (self._times[h][0], now)
        self._touched.add(h)

    def _touched_times(self) -> list[tuple[bytes, float]]:
        return [(h, self._times[h][1]) for h in self._touched if h in self._lru]

    def flush_touched(self) -> None:
        """Persist the recency of blocks used since the last prefix commit."""
        touched = self._touched_times()
        if touched:
            self._meta.commit_prefixes([], [], touched)
        self._touched.clear()

    # -- storing ----------------------------------------------------------------------------

    def begin_put(self, items: Sequence[tuple[bytes, Any]]) -> PendingCommit:
        """SwapSpace.begin_put_prefix_blocks: stage the new blocks, skip pending hashes."""
        space = self._space
        views = space._views([p for _h, p in items], writable=False)
        now = time.time()
        with self._lock:
            new, seen = [], set()
            for (h, _p), v in zip(items, views):
                if h in self._lru:
                    self._touch(h, now)
                elif h not in self._pending and h not in seen:
                    seen.add(h)
                    new.append((h, v))
            try:
                refs = space._allocate(len(new), "staged", partial=True)
            except SwapError as exc:
                space._record(exc)
                raise
            new = new[:len(refs)]
            self._pending.update(h for h, _v in new)
        try:
            write = space._begin_write(refs, [v for _h, v in new]) if refs else None
        except SwapError:
            with self._lock:
                self._pending.difference_update(h for h, _v in new)
            raise
        return PendingCommit("prefix", refs, write, prefix=[h for h, _v in new], now=now)

    def finish_put(self, p: PendingCommit) -> int:
        """The commit half of SwapSpace.finish for a prefix put; the number stored."""
        space = self._space
        try:
            crcs = space._end_write(p.refs, p.write) if p.write is not None else []
            added = [(h, SlotRecord(r.slot_id, r.generation, c), p.now)
                     for h, r, c in zip(p.prefix, p.refs, crcs)]
            space._commit(self._commit_add, added)
        finally:
            with self._lock:
                self._pending.difference_update(p.prefix)
        return len(added)

    def _commit_add(self, added) -> None:
        self._meta.commit_prefixes(added, [], self._touched_times())
        self._touched.clear()
        self._slots.commit([rec.slot_id for _h, rec, _now in added], "prefix")
        for h, rec, now in added:
            self._lru[h] = rec.slot_id
            self._times[h] = (now, now)

    # -- reading ----------------------------------------------------------------------------

    def count_stored(self, hashes: Sequence[bytes]) -> int:
        """How many leading hashes are stored (no I/O; caller holds the lock)."""
        n = 0
        while n < len(hashes) and hashes[n] in self._lru:
            n += 1
        return n

    def get(self, hashes: Sequence[bytes], into: Sequence[Any]) -> int:
        """SwapSpace.get_prefix_blocks: read the leading run, drop corrupt entries."""
        space = self._space
        with self._lock:
            n = min(self.count_stored(hashes), len(into))
            slots = [self._lru[h] for h in hashes[:n]]
            refs = [self._slots.ref(s) for s in slots]
            self._slots.pin(slots)
        try:
            results = space.read_refs(refs, into[:n]) if n else []
        finally:
            with self._lock:
                self._slots.unpin(slots)
        ok = next((i for i, e in enumerate(results) if e is not None), n)
        now = time.time()
        with self._lock:
            for h in hashes[:ok]:
                if h in self._lru:
                    self._touch(h, now)
            bad = [(h, self._lru[h]) for h, e in zip(hashes, results)
                   if isinstance(e, SlotCorruptError) and self._lru.get(h) is not None]
            self.hits += ok
            self.misses += len(hashes) - ok
            if bad:
                try:
                    self._drop(bad)
                except SwapError as exc:
                    space._record(exc)
        return ok

    def drop(self, hashes: Sequence[bytes]) -> int:
        """SwapSpace.drop_prefix_blocks: forget stored blocks; how many there were."""
        with self._lock:
            victims = [(h, self._lru[h]) for h in dict.fromkeys(hashes) if h in self._lru]
            if victims:
                try:
                    self._drop(victims)
                except SwapError as exc:
                    self._space._record(exc)
                    raise
            return len(victims)

    # -- describing -------------------------------------------------------------------------

    def infos(self) -> list[PrefixInfo]:
        with self._lock:
            return [self._info(h) for h in self._lru]

    def info(self, block_hash: bytes) -> PrefixInfo:
        with self._lock:
            return self._info(block_hash)

    def _info(self, h: bytes) -> PrefixInfo:
        if h not in self._lru:
            raise SwapNotFoundError(f"prefix block {h.hex()} is not stored")
        slot = self._lru[h]
        created, last_used = self._times[h]
        return PrefixInfo(h, slot, self._slots.ref(slot).generation, created, last_used)

    def snapshot(self, block_hash: bytes) -> Snapshot:
        """SwapSpace.prefix_snapshot: pin one block for a reader."""
        with self._lock:
            info = self._info(block_hash)
            self._slots.pin([info.slot_id])
            return Snapshot((self._slots.ref(info.slot_id),), prefix=info)

    # -- the hash scheme (issue 8: tenant-salted chains) ------------------------------------

    def adopt_scheme(self, scheme: str) -> int:
        """SwapSpace.adopt_prefix_scheme: drop every block stored under another scheme."""
        meta = self._meta
        with self._lock:
            if meta.tag("prefix_hash_scheme") == scheme:
                return 0
            victims = list(self._lru.items())
            meta.retag_prefixes("prefix_hash_scheme", scheme, victims)
            self._forget(victims)
            return len(victims)
