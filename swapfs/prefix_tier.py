"""PrefixMethods: the prefix-cache tier of SwapSpace (a mixin over its slot bookkeeping,
kept apart only for size).

Blocks of complete prefixes, keyed by the engine's chained block hash, stored durably and
found again across requests, clients and restarts. The tier is a cache: least recently
used blocks are evicted when any allocation finds no free slot, a lookup stops at the first
miss (a chain is only useful up to its first hole), and a corrupt or unreadable block is a
miss (counted in the statistics, corrupt entries dropped) rather than an exception.
Recency is kept in memory and persisted lazily with the next prefix commit or at close.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from swapfs.errors import SlotCorruptError, SwapError, SwapNotFoundError
from swapfs.metadata import SlotRecord
from swapfs.pending_commit import PendingCommit
from swapfs.records import PrefixInfo, Snapshot, SlotRef


class PrefixMethods:
    """Mixed into SwapSpace; uses its _lock, _meta, _owner, _prefix, _prefix_times,
    _touched, _pending_hashes, _counts."""

    def _evict_prefixes(self, n: int) -> None:
        victims = []
        for h, slot in self._prefix.items():
            if len(victims) == n:
                break
            if not self._pins[slot]:
                victims.append((h, slot))
        if victims:
            self._drop_prefixes(victims)
            self._counts["prefix_evictions"] += len(victims)

    def _drop_prefixes(self, victims: Sequence[tuple[bytes, int]]) -> None:
        self._meta.commit_prefixes([], victims, [])
        for h, slot in victims:
            del self._prefix[h]
            del self._prefix_times[h]
            self._touched.discard(h)
        self._release([slot for _h, slot in victims])

    def _flush_touched(self) -> list[tuple[bytes, float]]:
        touched = [(h, self._prefix_times[h][1]) for h in self._touched if h in self._prefix]
        if touched:
            self._meta.commit_prefixes([], [], touched)
        self._touched.clear()
        return touched

    def put_prefix_blocks(self, items: Sequence[tuple[bytes, Any]]) -> int:
        """Store (block hash, payload) pairs, parents first. Hashes already stored are only
        marked recently used. When space runs short the oldest prefix blocks are evicted and
        only the leading items that fit are stored. Returns how many new blocks were stored."""
        return self.finish(self.begin_put_prefix_blocks(items))

    def begin_put_prefix_blocks(self, items: Sequence[tuple[bytes, Any]]) -> PendingCommit:
        """Start `put_prefix_blocks`: the new blocks are written (at KV_WRITE_BACK) into staged
        slots, committed by `finish(pending)`; the payloads must stay unchanged until then.
        Their hashes count as pending (other puts skip them) until finish."""
        views = self._views([p for _h, p in items], writable=False)
        now = time.time()
        with self._lock:
            new, seen = [], set()
            for (h, _p), v in zip(items, views):
                if h in self._prefix:
                    self._prefix.move_to_end(h)
                    self._prefix_times[h] = (self._prefix_times[h][0], now)
                    self._touched.add(h)
                elif h not in self._pending_hashes and h not in seen:
                    seen.add(h)
                    new.append((h, v))
            try:
                refs = self._allocate(len(new), "staged", partial=True)
            except SwapError as exc:
                self._record(exc)
                raise
            new = new[:len(refs)]
            self._pending_hashes.update(h for h, _v in new)
        try:
            write = self._begin_write(refs, [v for _h, v in new]) if refs else None
        except SwapError:
            with self._lock:
                self._pending_hashes.difference_update(h for h, _v in new)
            raise
        return PendingCommit("prefix", refs, write, prefix=[h for h, _v in new], now=now)

    def _finish_prefix(self, p: PendingCommit) -> int:
        try:
            crcs = self._end_write(p.refs, p.write) if p.write is not None else []
            added = [(h, SlotRecord(r.slot_id, r.generation, c), p.now)
                     for h, r, c in zip(p.prefix, p.refs, crcs)]
            self._commit(self._commit_prefix_add, added)
        finally:
            with self._lock:
                self._pending_hashes.difference_update(p.prefix)
        return len(added)

    def _commit_prefix_add(self, added) -> None:
        touched = [(h, self._prefix_times[h][1]) for h in self._touched if h in self._prefix]
        self._meta.commit_prefixes(added, [], touched)
        self._touched.clear()
        for h, rec, now in added:
            self._owner[rec.slot_id].kind = "prefix"
            self._prefix[h] = rec.slot_id
            self._prefix_times[h] = (now, now)

    def has_prefix_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many leading hashes are stored (no I/O)."""
        with self._lock:
            n = 0
            while n < len(hashes) and hashes[n] in self._prefix:
                n += 1
            return n

    def get_prefix_blocks(self, hashes: Sequence[bytes], into: Sequence[Any]) -> int:
        """Read the leading stored blocks of `hashes` into `into`; returns how many were read
        and verified (a miss, a corrupt or an unreadable block ends the run; corrupt entries
        are dropped; errors are counted, not raised, since a miss is the cache's answer)."""
        with self._lock:
            n = min(self.has_prefix_blocks(hashes), len(into))
            slots = [self._prefix[h] for h in hashes[:n]]
            refs = [SlotRef(s, self._owner[s].generation) for s in slots]
            self._pin(slots)
        try:
            results = self.read_refs(refs, into[:n]) if n else []
        finally:
            with self._lock:
                self._unpin(slots)
        ok = next((i for i, e in enumerate(results) if e is not None), n)
        now = time.time()
        with self._lock:
            for h in hashes[:ok]:
                if h in self._prefix:
                    self._prefix.move_to_end(h)
                    self._prefix_times[h] = (self._prefix_times[h][0], now)
                    self._touched.add(h)
            bad = [(h, self._prefix[h]) for h, e in zip(hashes, results)
                   if isinstance(e, SlotCorruptError) and self._prefix.get(h) is not None]
            self._counts["prefix_hits"] += ok
            self._counts["prefix_misses"] += len(hashes) - ok
            if bad:
                try:
                    self._drop_prefixes(bad)
                except SwapError as exc:
                    self._record(exc)
        return ok

    def get_prefix_block(self, block_hash: bytes, into: Any) -> bool:
        return self.get_prefix_blocks([block_hash], [into]) == 1

    def drop_prefix_blocks(self, hashes: Sequence[bytes]) -> int:
        """Forget stored prefix blocks (e.g. `rm -r` on the mount); returns how many."""
        with self._lock:
            victims = [(h, self._prefix[h]) for h in dict.fromkeys(hashes) if h in self._prefix]
            if victims:
                try:
                    self._drop_prefixes(victims)
                except SwapError as exc:
                    self._record(exc)
                    raise
            return len(victims)

    def list_prefixes(self) -> list[PrefixInfo]:
        with self._lock:
            return [self._prefix_info(h) for h in self._prefix]

    def prefix_info(self, block_hash: bytes) -> PrefixInfo:
        with self._lock:
            if block_hash not in self._prefix:
                raise SwapNotFoundError(f"prefix block {block_hash.hex()} is not stored")
            return self._prefix_info(block_hash)

    def _prefix_info(self, h: bytes) -> PrefixInfo:
        slot = self._prefix[h]
        created, last_used = self._prefix_times[h]
        return PrefixInfo(h, slot, self._owner[slot].generation, created, last_used)

    def prefix_snapshot(self, block_hash: bytes) -> Snapshot:
        with self._lock:
            if block_hash not in self._prefix:
                raise SwapNotFoundError(f"prefix block {block_hash.hex()} is not stored")
            info = self._prefix_info(block_hash)
            self._pin([info.slot_id])
            ref = SlotRef(info.slot_id, info.generation, self._owner[info.slot_id].crc)
            return Snapshot((ref,), prefix=info)

    # -- the hash scheme (issue 8: tenant-salted chains) -----------------------------------

    def adopt_prefix_scheme(self, scheme: str) -> int:
        """Record that prefix blocks are keyed by `scheme` from now on; every block stored
        under another (or no recorded) scheme is dropped, never served. Returns how many."""
        with self._lock:
            if self._meta.tag("prefix_hash_scheme") == scheme:
                return 0
            victims = list(self._prefix.items())
            self._meta.retag_prefixes("prefix_hash_scheme", scheme, victims)
            for h, _slot in victims:
                del self._prefix[h]
                del self._prefix_times[h]
                self._touched.discard(h)
            self._release([slot for _h, slot in victims])
            return len(victims)
