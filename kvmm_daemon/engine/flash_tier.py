"""FlashTier: how the engine uses swapfs — the KV pool's second tier on flash.

Three uses, all on the engine's worker thread (never on the event loop):
* **Preemption by swap**: a preempted sequence's written blocks go to swap slots and come
  back into fresh blocks on re-admission, when the cost model says reading them back is
  cheaper than recomputing: bytes / measured write+read bandwidth vs tokens / measured
  prefill speed (both measured, EWMA; not constants).
* **Prefix cache, tier 2**: a cached block the pool evicts is copied to a staging buffer in
  the eviction hook and submitted (batched) to flash at the end of the step; on admission the
  prefix found in memory is extended by the blocks found on flash, by the same chained hash
  (so hits survive memory pressure and restarts, across requests and clients).
* **Sessions**: after each turn a session's KV is written through to flash (incrementally:
  unchanged leading blocks are kept; the blocks written are copied first, so the KV pool may
  reuse or extend them at once), so a restart finds every committed session; an idle
  session's memory is released and its next turn loads it back at admission.

Session write-through and prefix writes are deferred: they are submitted at KV_WRITE_BACK
priority and the step returns; `complete()` (run at the end of every step, blocking only in a
step that computed nothing, and at close) commits each one whose writes have ended — writes
checked, fdatasync, then the SQLite commit, so a kill -9 at any instant leaves the previous
committed version. At most MAX_PENDING commits wait at once (the oldest is completed first);
a session's earlier save is completed before its next save, its load or its delete.

Every swapfs failure (full disk, EIO, a corrupt slot) degrades to recompute: it is counted,
logged once per kind by swapfs, and the request goes on. Left out: asynchronous prefetch of
a session ahead of its request (the load happens at admission, before its first step).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvmm_daemon.engine.sequence import Sequence
from kvmm_daemon.kv.block_hash import hash_block
from kvmm_daemon.kv.kv_cache import KVCache
from kvmm_daemon.kv.kv_manager import KVCacheManager
from swapfs.errors import SwapError

log = logging.getLogger("kvmm.engine")

MAX_STAGED_BLOCKS = 64
MAX_PENDING = 8
LOG_EVERY = 100


@dataclass(slots=True, eq=False)
class Deferred:
    """A submitted, uncommitted flash write: `commit` is swapfs's PendingCommit; `what`
    names the operation in errors; session_id / kv_tokens are set for a session save (the
    tokens whose KV it writes); on_done(ok) runs once it is committed (True) or dropped
    (False); keep holds the payloads written from (prefix copies) until then."""

    what: str
    commit: object
    session_id: str | None = None
    kv_tokens: int = 0
    on_done: Callable[[bool], None] | None = None
    keep: object = None
    epoch: int = 0


@dataclass(slots=True)
class Swapped:
    """A preempted sequence's KV on flash: handles[i] holds block i; tokens = how many
    leading tokens those blocks hold."""

    handles: list
    tokens: int


@dataclass(slots=True)
class TierStats:
    swap_preemptions: int = 0
    recompute_preemptions: int = 0
    swapped_in_tokens: int = 0
    prefix_tokens_from_flash: int = 0
    session_tokens_from_flash: int = 0
    prefix_blocks_written: int = 0
    errors: dict = field(default_factory=dict)


class FlashTier:
    """Attributes and invariants:
        swapped: seq_id -> Swapped for every preempted sequence whose KV is on flash; an entry
            exists iff the sequence holds no blocks in `kv` and its handles are live.
        _staged: (hash, bytes copy) of evicted cached blocks not yet submitted (<= MAX_STAGED).
        _pending: Deferred writes submitted and not yet committed, oldest first
            (<= MAX_PENDING after every submission); at most one per session id.
        _epoch: complete() calls so far; a Deferred's epoch is the value at its submission,
            so complete(block=False) takes only writes submitted before the previous call
            (they had at least one step's compute to finish in).
        prefill_tps: EWMA of measured prefill tokens/s (0 until the first measurement).
        _logged: (operation, error kind) -> failures so far (drives log rate limiting).
    """

    def __init__(self, swap, kv_cache: KVCache, kv: KVCacheManager, *, preemption: str = "auto") -> None:
        self.swap = swap
        self.preemption = preemption
        self.kv_cache = kv_cache
        self.kv = kv
        self.bs = kv.block_size
        self.swapped: dict[int, Swapped] = {}
        self._staged: list[tuple[bytes, np.ndarray]] = []
        self._pending: list[Deferred] = []
        self._epoch = 0
        self.prefill_tps = 0.0
        self.stats = TierStats()
        self._logged: dict[tuple[str, str], int] = {}
        kv.pool.on_evict = self._on_evict

    # --- measurements and the cost model ------------------------------------------------

    def record_prefill(self, tokens: int, seconds: float) -> None:
        if tokens >= 16 and seconds > 0:
            tps = tokens / seconds
            self.prefill_tps = tps if not self.prefill_tps else 0.7 * self.prefill_tps + 0.3 * tps

    def swap_is_cheaper(self, tokens: int) -> bool:
        """Swap out+in of `tokens` tokens' blocks vs recomputing them, by measured speeds."""
        if self.preemption != "auto":
            return self.preemption == "swap"
        st = self.swap.statistics()
        if st.write_bandwidth <= 0 or st.read_bandwidth <= 0 or st.free_slots == 0:
            return False
        if not self.prefill_tps:
            return True     # nothing measured yet: flash is cheaper for any real model
        nbytes = -(-tokens // self.bs) * self.kv_cache.block_bytes
        swap_s = nbytes / st.write_bandwidth + nbytes / st.read_bandwidth
        return swap_s < tokens / self.prefill_tps

    def _error(self, what: str, exc: SwapError) -> None:
        """Count a failure; log it at WARNING the first time per (operation, kind) and every
        LOG_EVERY-th time after, so a dead device does not flood the log every step."""
        kind = getattr(exc, "kind", type(exc).__name__)
        self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
        seen = self._logged[what, kind] = self._logged.get((what, kind), 0) + 1
        if seen == 1 or seen % LOG_EVERY == 0:
            log.warning("flash tier: %s failed (%d times so far), recomputing instead: %s", what, seen, exc)

    def _views(self, block_ids: list[int]) -> list[list[memoryview]]:
        """Each block's bytes as its per-layer pieces in the arena (swapfs moves them with
        one vectored request, no copy)."""
        return [self.kv_cache.block_pieces(b) for b in block_ids]

    # --- preemption by swap -------------------------------------------------------------

    def swap_out(self, seq: Sequence) -> bool:
        """Write seq's written blocks to flash before its blocks are freed. True if done."""
        tokens = seq.num_computed_tokens
        if tokens < self.bs or not self.swap_is_cheaper(tokens):
            self.stats.recompute_preemptions += 1
            return False
        blocks = self.kv.block_table(seq.seq_id)[: -(-tokens // self.bs)]
        try:
            handles = self.swap.swap_out(self._views(blocks))
        except SwapError as exc:
            self._error("swap-out", exc)
            self.stats.recompute_preemptions += 1
            return False
        self.swapped[seq.seq_id] = Swapped(handles, tokens)
        self.stats.swap_preemptions += 1
        return True

    def drop(self, seq: Sequence) -> None:
        """Forget a swapped sequence (aborted or finished while waiting)."""
        entry = self.swapped.pop(seq.seq_id, None)
        if entry is not None:
            try:
                self.swap.free(entry.handles)
            except SwapError as exc:
                self._error("swap free", exc)

    # --- restoring KV at admission ------------------------------------------------------

    def restore(self, seq: Sequence, session_id: str | None) -> int:
        """After kv.allocate: fill what flash holds of seq's KV beyond the in-memory prefix
        hit (swapped blocks, else the session's blocks, else prefix blocks); commits the
        restored tokens and returns how many there are."""
        have = self.kv.num_computed_tokens(seq.seq_id)
        table = self.kv.block_table(seq.seq_id)
        first = have // self.bs                       # blocks before this were prefix hits
        got = 0
        entry = self.swapped.pop(seq.seq_id, None)
        if entry is None and session_id is not None:  # load the newest version if it adds KV
            self._settle_session(session_id, beyond=have)
        if entry is not None:
            got = self._swap_in(entry, table, first)
            self.stats.swapped_in_tokens += got
        elif session_id is not None and self.has_session(session_id):
            got = self._load_session(session_id, seq, table, first)
            self.stats.session_tokens_from_flash += got
        if got == 0:
            got = self._prefix_from_flash(seq, table, first)
            self.stats.prefix_tokens_from_flash += got
        got = max(0, min(got, len(seq.token_ids) - 1) - have)
        if got:
            self.kv.commit(seq.seq_id, got)
        return got

    def _swap_in(self, entry: Swapped, table: list[int], first: int) -> int:
        handles = entry.handles
        if first:
            self.swap.free(handles[:first])
        try:
            self.swap.swap_in(handles[first:], self._views(table[first:len(handles)]))
        except SwapError as exc:
            self._error("swap-in", exc)
            return 0
        return entry.tokens

    def _load_session(self, session_id: str, seq: Sequence, table: list[int], first: int) -> int:
        try:
            info = self.swap.session_info(session_id)
        except SwapError as exc:            # deleted meanwhile, or the metadata is unreadable
            if not isinstance(exc, KeyError):
                self._error("session lookup", exc)
            return 0
        if tuple(seq.token_ids[:len(info.token_ids)]) != info.token_ids:
            return 0
        if info.num_kv_tokens <= self.kv.num_computed_tokens(seq.seq_id):
            return 0     # memory holds as much (e.g. the parked KV, newer than a stored save)
        nblocks = info.num_blocks
        # blocks already hit in memory are read into scratch, never into shared blocks
        scratch = [np.empty(self.kv_cache.block_bytes, dtype=np.uint8) for _ in range(min(first, nblocks))]
        try:
            self.swap.load_session(session_id, scratch + self._views(table[len(scratch):nblocks]))
        except SwapError as exc:
            self._error("session load", exc)
            loaded = getattr(exc, "blocks_loaded", 0)
            return loaded * self.bs if loaded > first else 0
        return info.num_kv_tokens

    def _prefix_from_flash(self, seq: Sequence, table: list[int], first: int) -> int:
        max_blocks = (len(seq.token_ids) - 1) // self.bs
        if first >= max_blocks:
            return 0
        hashes = self.kv.block_hashes(seq.seq_id)[:first]
        parent = hashes[-1] if hashes else self.kv.root_hash(seq.seq_id)
        want = []
        for i in range(first, max_blocks):
            parent = hash_block(parent, seq.token_ids[i * self.bs:(i + 1) * self.bs], self.kv.model_id)
            want.append(parent)
        if not self.swap.has_prefix_blocks(want):
            return 0
        n = self.swap.get_prefix_blocks(want, self._views(table[first:max_blocks]))
        return (first + n) * self.bs if n else 0

    # --- prefix blocks evicted from memory ----------------------------------------------

    def _on_evict(self, block, block_hash: bytes) -> None:
        """Pool hook: the block is about to be reused; keep a copy of its bytes."""
        if len(self._staged) >= MAX_STAGED_BLOCKS:
            self.flush()
        self._staged.append((block_hash, b"".join(self.kv_cache.block_pieces(block.block_id))))

    def flush(self) -> None:
        """Submit staged evicted prefix blocks to flash (end of step); committed later."""
        if not self._staged:
            return
        staged, self._staged = self._staged, []
        try:
            commit = self.swap.begin_put_prefix_blocks(staged)
        except SwapError as exc:
            self._error("prefix write", exc)
            return

        def done(ok: bool) -> None:
            if ok:
                self.stats.prefix_blocks_written += commit.result
        self._defer(Deferred("prefix write", commit, on_done=done, keep=staged))

    # --- deferred writes ----------------------------------------------------------------

    def _defer(self, d: Deferred) -> None:
        d.epoch = self._epoch
        self._pending.append(d)
        while len(self._pending) > MAX_PENDING:
            self._complete(self._pending[0])

    def has_pending(self) -> bool:
        return bool(self._pending)

    def saving(self, session_id: str) -> bool:
        """A save of the session is submitted (from a copy) and not yet committed."""
        return any(d.session_id == session_id for d in self._pending)

    def complete(self, *, block: bool = False) -> None:
        """Commit the deferred writes submitted before the previous call whose I/O has ended
        (every one, waiting for it, if block)."""
        ready = [d for d in self._pending if block or (d.epoch < self._epoch and d.commit.done())]
        self._epoch += 1
        for d in ready:
            self._complete(d)

    def _settle_session(self, session_id: str, *, beyond: int = -1) -> None:
        """Commit (waiting) a pending save of `session_id` that holds more than `beyond`
        tokens' KV, if any."""
        for d in [d for d in self._pending if d.session_id == session_id and d.kv_tokens > beyond]:
            self._complete(d)

    def _complete(self, d: Deferred) -> None:
        self._pending.remove(d)
        try:
            self.swap.finish(d.commit)
            ok = True
        except SwapError as exc:
            self._error(d.what, exc)
            ok = False
        if d.on_done is not None:
            d.on_done(ok)

    # --- sessions -----------------------------------------------------------------------

    def has_session(self, session_id: str) -> bool:
        """True iff the session is stored; an unreadable store counts as "not stored"."""
        try:
            self.swap.session_info(session_id)
        except KeyError:
            return False
        except SwapError as exc:
            self._error("session lookup", exc)
            return False
        return True

    def stored_sessions(self) -> list:
        return self.swap.list_sessions()

    def save_session(self, session_id: str, owner_uid: int, token_ids: list[int], seq_id: int,
                     on_done: Callable[[bool], None] | None = None) -> bool:
        """Submit a parked session's KV to flash (incremental, the blocks copied first); it is
        committed by a later complete(), which calls on_done(True) then (on_done(False) if
        the write or its commit fails). False if it could not even be submitted."""
        self._settle_session(session_id)
        tokens = self.kv.num_computed_tokens(seq_id)
        blocks = self.kv.block_table(seq_id)[: -(-tokens // self.bs)]
        try:
            commit = self.swap.begin_save_session(session_id, owner_uid, token_ids, self._views(blocks),
                                                  num_kv_tokens=tokens, copy=True)
        except SwapError as exc:
            self._error("session save", exc)
            return False
        self._defer(Deferred("session save", commit, session_id, tokens, on_done))
        return True

    def delete_session(self, session_id: str) -> None:
        self._settle_session(session_id)
        try:
            self.swap.delete_session(session_id)
        except SwapError as exc:
            if not isinstance(exc, KeyError):
                self._error("session delete", exc)

    def close(self) -> None:
        """Submit staged prefix blocks, commit every deferred write, close the store. Never
        raises: a device that is gone (EIO, an aborted FUSE connection: ENOTCONN from close)
        is logged and left."""
        self.flush()
        self.complete(block=True)
        try:
            self.swap.close()
        except (SwapError, OSError) as exc:
            log.warning("flash tier: closing the swap space failed (ignored): %s", exc)

    def statistics(self) -> dict:
        from dataclasses import asdict
        st = self.swap.statistics()
        d = {k: v for k, v in asdict(self.stats).items()}
        d.update(capacity_slots=st.capacity_slots, free_slots=st.free_slots, swap_slots=st.swap_slots,
                 prefix_slots=st.prefix_slots, session_slots=st.session_slots,
                 write_bandwidth=st.write_bandwidth, read_bandwidth=st.read_bandwidth,
                 swapfs_errors=dict(st.errors), prefill_tokens_per_s=self.prefill_tps)
        return d
