"""SwapSpace: the flash tier the engine calls — swap-out/in of preempted blocks, a second
tier for the prefix cache, and persistent sessions — over a SlotStore and its Metadata.

Three kinds of slot content:
  swap     blocks of a preempted request; written without fdatasync or metadata (they die
           with the process); never evicted; freed by swap_in(release=True) or free().
  prefix   prefix-cache blocks by chained hash; durable; an LRU cache: evicted (oldest first)
           when any allocation finds no free slot.
  session  a session's blocks in order with its token ids; durable; never evicted.
Durable writes go: allocate slots -> write (O_DIRECT) -> fdatasync -> one SQLite commit.
A slot is reused only after the commit that dropped it, and never while a reader has it
pinned (a Snapshot, a swap_in or a prefix read in flight), so no reader sees a block that
is being rewritten; the slot header's generation catches everything else. That bookkeeping
is slot_map.SlotMap's; the prefix tier and the sessions are parts composed here
(prefix_tier.PrefixTier, stored_sessions.StoredSessions); the swap kind and the slot I/O
they share (write, verify, fdatasync, commit) are this class's.

The sync API is thread-safe and blocking (call it from the engine's worker thread; from
trio use `swapfs.trio_api.TrioSwapSpace`). Every failure is a typed `SwapError`, counted in
`statistics().errors` by kind and logged at ERROR once per kind. Prior art: vLLM's
swap_in/swap_out block mappings, LMCache's local-disk tier. Left out: compression,
deduplication of session blocks against prefix blocks.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from iosched.aligned_buffer import AlignedBuffer
from swapfs.block_buffer import BlockBuffer
from swapfs.errors import (SwapConfigError, SwapConflictError, SwapError, SwapFullError,
                           SwapNotFoundError, from_os_error)
from swapfs.layout import KVLayout
from swapfs.metadata import Metadata
from swapfs.pending_commit import PendingCommit
from swapfs.prefix_tier import PrefixTier
from swapfs.records import (PrefixInfo, SessionInfo, Snapshot, SlotRef, SwapHandle,
                            SwapStats)
from swapfs.slot_map import SlotMap
from swapfs.stored_sessions import StoredSessions
from iosched import IOScheduler
from swapfs.slot_store import SUPER_BYTES, PendingWrite, SlotStore, slot_stride

log = logging.getLogger("kvmm.swapfs")

SLOT_FILE = "kvmm-swap.slots"
META_FILE = "kvmm-swap.sqlite"
_EWMA = 0.3


def _ewma(old: float, sample: float) -> float:
    return sample if old == 0.0 else (1 - _EWMA) * old + _EWMA * sample


class SwapSpace:
    """Attributes:
      _store: the slot file (SlotStore); _meta: the metadata (Metadata).
      _slots: the SlotMap of `_store`'s slots (which are free, owned by which kind, pinned,
        their generations), guarded by `_lock` like everything below; its "session" slots
        are exactly those of `_sessions`, its "prefix" slots those of `_prefixes`, and its
        "swap" and "staged" slots are named by no committed metadata.
      _prefixes: the PrefixTier (hash index, recency, eviction); _sessions: the
        StoredSessions (with `_session_lock`, taken before `_lock`). Both are parts of this
        space that own their state and use its lock, metadata, SlotMap and slot I/O.
      _errors / _logged: SwapErrors counted by kind / kinds logged at ERROR once.
      _bw, _commit_s, _counts: bandwidth and commit-time averages, swap counters.
    """

    def __init__(self, swap_dir: str, swap_size: int, layout: KVLayout, *, io_threads: int = 8,
                 calibrate: bool = True, checksum: str | None = None,
                 scheduler: IOScheduler | None = None) -> None:
        stride = slot_stride(layout.block_bytes)
        num_slots = (swap_size - SUPER_BYTES) // stride
        if num_slots < 1:
            raise SwapConfigError(f"--swap-size {swap_size} bytes holds no KV block of {stride}"
                                  f" bytes; raise --swap-size to at least {SUPER_BYTES + stride}")
        try:
            os.makedirs(swap_dir, exist_ok=True)
        except OSError as exc:
            raise from_os_error(exc, f"creating --swap-dir {swap_dir}") from exc
        self.layout = layout
        self._lock = threading.RLock()
        self._store = SlotStore(os.path.join(swap_dir, SLOT_FILE), layout.block_bytes, num_slots,
                                layout.layout_id, io_threads=io_threads,
                                checksum_name=checksum, scheduler=scheduler)
        self.checksum_name = self._store.checksum_name
        try:
            self._meta = Metadata(os.path.join(swap_dir, META_FILE))
            self._load(num_slots)
        except BaseException:
            self._store.close()
            raise
        self._errors: Counter[str] = Counter()
        self._logged: set[str] = set()
        self._bw = {"read": 0.0, "write": 0.0}
        self._commit_s = 0.0
        self._counts: Counter[str] = Counter()
        if calibrate:
            self.calibrate()

    def _load(self, num_slots: int) -> None:
        identity = {"layout": self.layout.to_json(), "num_slots": str(num_slots),
                    "payload_bytes": str(self.layout.block_bytes)}
        old = self._meta.identity()
        if old != identity or self._store.reinitialized:
            if old:
                why = ("the slot file was missing or reformatted" if old == identity else
                       f"layout/size changed from {old} to {identity}")
                log.warning("swapfs: dropping every stored session and prefix block: %s", why)
            self._meta.reset(identity)
        used = self._meta.used_slots()
        self._slots = SlotMap(num_slots, {s: (k, g, c) for s, (g, k, c) in used.items()})
        self._prefixes = PrefixTier(self)
        self._sessions = StoredSessions(self)

    def close(self) -> None:
        with self._lock:
            try:
                self._prefixes.flush_touched()
            except SwapError as exc:
                self._record(exc)
            try:
                self._store.close()
            finally:
                self._meta.close()

    def __enter__(self) -> SwapSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- slot bookkeeping (callers hold _lock) -------------------------------------------------

    def _allocate(self, n: int, kind: str, *, partial: bool = False) -> list[SlotRef]:
        """`n` slots of `kind` ("swap" or "staged"), evicting the least recently used prefix
        blocks when too few are free; with `partial` as many as there are, else
        SwapFullError when short."""
        if self._slots.num_free < n:
            self._prefixes.evict(n - self._slots.num_free)
        if self._slots.num_free < n:
            if not partial:
                raise SwapFullError(
                    f"swap space full: {self._slots.num_owned} of {self._slots.num_slots} slots"
                    f" hold sessions and swapped blocks, {n} more needed; raise --swap-size or"
                    " delete sessions")
            n = self._slots.num_free
        refs = self._slots.allocate(n, kind)
        assert refs is not None
        return refs

    def discard_staged(self, refs: Sequence[SlotRef]) -> None:
        """Free staged slots no commit named (those since freed or reused are ignored)."""
        with self._lock:
            self._slots.release_live(refs, "staged")

    def _record(self, exc: SwapError) -> None:
        with self._lock:
            self._errors[exc.kind] += 1
            first = exc.kind not in self._logged
            self._logged.add(exc.kind)
        log.log(logging.ERROR if first else logging.DEBUG, "swapfs: %s", exc)

    def _measure(self, what: str, nbytes: int, seconds: float) -> None:
        if nbytes >= 1 << 20 and seconds > 0:
            with self._lock:
                self._bw[what] = _ewma(self._bw[what], nbytes / seconds)

    def _views(self, bufs: Sequence[Any], *, writable: bool) -> list[BlockBuffer]:
        """Each block's buffer (one buffer, or a list of pieces: BlockBuffer.of), checked
        to hold one block."""
        views = [BlockBuffer.of(b, writable=writable) for b in bufs]
        for v in views:
            if v.nbytes != self.layout.block_bytes:
                raise ValueError(f"KV block buffer of {v.nbytes} bytes; this swap space holds"
                                 f" blocks of {self.layout.block_bytes} bytes")
        return views

    # -- raw slot I/O shared by every kind ------------------------------------------------------

    def _write(self, refs: Sequence[SlotRef], views: Sequence[BlockBuffer]) -> list[int]:
        return self._end_write(refs, self._begin_write(refs, views))

    def _begin_write(self, refs: Sequence[SlotRef], views: Sequence[BlockBuffer]) -> PendingWrite:
        """Submit the writes of `views` into the allocated slots `refs`; on a failure to
        submit the slots are released and the error recorded and raised."""
        try:
            return self._store.submit_write([(r.slot_id, r.generation, v)
                                             for r, v in zip(refs, views)])
        except SwapError as exc:
            with self._lock:
                self._slots.release(r.slot_id for r in refs)
            self._record(exc)
            raise

    def _end_write(self, refs: Sequence[SlotRef], pending: PendingWrite) -> list[int]:
        """Wait for a `_begin_write`; its checksums (kept with the slots). On failure the
        slots are released and the error recorded and raised."""
        try:
            crcs = self._store.finish_write(pending)
        except SwapError as exc:
            with self._lock:
                self._slots.release_live(refs)
            self._record(exc)
            raise
        self._measure("write", len(refs) * self.layout.block_bytes,
                      time.perf_counter() - pending.started)
        with self._lock:
            for r, crc in zip(refs, crcs):
                self._slots.set_crc(r.slot_id, crc)
        return crcs

    def read_refs(self, refs: Sequence[SlotRef], into: Sequence[Any]) -> list[SwapError | None]:
        """Read pinned/owned slots into `into`; per item None or the error (already counted)."""
        views = self._views(into, writable=True)
        t0 = time.perf_counter()
        try:
            results = self._store.read([(r.slot_id, r.generation, v)
                                        for r, v in zip(refs, views)])
        except SwapError as exc:
            results = [exc] * len(refs)
        self._measure("read", len(refs) * self.layout.block_bytes, time.perf_counter() - t0)
        for exc in {id(e): e for e in results if e is not None}.values():
            self._record(exc)
        return results

    def _commit(self, fn, *args) -> None:
        """fdatasync the slot data, then run one metadata transaction."""
        t0 = time.perf_counter()
        try:
            self._store.sync()
            with self._lock:
                fn(*args)
        except SwapError as exc:
            self._record(exc)
            raise
        with self._lock:
            self._commit_s = _ewma(self._commit_s, time.perf_counter() - t0)

    # -- deferred durable writes (sessions, prefixes) -----------------------------------------

    def finish(self, pending: PendingCommit):
        """Complete a begin_save_session / begin_put_prefix_blocks: wait for its writes, check
        them, fdatasync, commit the metadata; returns the SessionInfo / the number of prefix
        blocks stored. On failure the staged slots are freed (the stored version stays) and
        the SwapError is recorded and raised. Idempotent (a second call answers the same)."""
        if pending.result is None:
            try:
                if pending.kind == "session":
                    pending.result = self._sessions.finish_save(pending)
                else:
                    pending.result = self._prefixes.finish_put(pending)
            except SwapError as exc:
                self.discard_staged(pending.refs)
                if isinstance(exc, SwapConflictError):
                    self._record(exc)
                pending.result = exc
            finally:
                if pending.staging is not None:
                    pending.staging.close()
                    pending.staging = None
        if isinstance(pending.result, SwapError):
            raise pending.result
        return pending.result

    # -- swap (preemption) ------------------------------------------------------------------------

    def swap_out(self, payloads: Sequence[Any]) -> list[SwapHandle]:
        """Write blocks of a preempted request; returns one handle per block, in order.
        Raises SwapFullError, SwapNoSpaceError, SwapIOError (nothing is kept then)."""
        views = self._views(payloads, writable=False)
        with self._lock:
            try:
                refs = self._allocate(len(views), "swap")
            except SwapError as exc:
                self._record(exc)
                raise
        self._write(refs, views)
        with self._lock:
            self._counts["swap_outs"] += len(refs)
        return [SwapHandle(r.slot_id, r.generation) for r in refs]

    def swap_in(self, handles: Sequence[SwapHandle], into: Sequence[Any], *,
                release: bool = True) -> None:
        """Read swapped blocks into `into` (same order). With `release` the handles are freed
        whatever happens. Raises SlotCorruptError/SwapIOError (the engine recomputes) and
        SwapNotFoundError for a handle that is not live."""
        if len(handles) != len(into):
            raise ValueError(f"{len(handles)} handles but {len(into)} destination blocks")
        slots = [h.slot_id for h in handles]
        with self._lock:
            for h in handles:
                if not self._slots.is_live(SlotRef(h.slot_id, h.generation), "swap"):
                    raise SwapNotFoundError(f"swap handle {h} is not live (freed already?)")
            self._slots.pin(slots)
        try:
            results = self.read_refs([SlotRef(h.slot_id, h.generation) for h in handles], into)
        finally:
            with self._lock:
                self._slots.unpin(slots)
                if release:
                    self._slots.release(slots)
                self._counts["swap_ins"] += len(slots)
        for exc in results:
            if exc is not None:
                raise exc

    def free(self, handles: Sequence[SwapHandle]) -> None:
        """Free swapped blocks; handles already freed are ignored."""
        with self._lock:
            self._slots.release_live((SlotRef(h.slot_id, h.generation) for h in handles), "swap")

    # -- sessions (StoredSessions) -----------------------------------------------------------

    def save_session(self, session_id: str, owner_uid: int, token_ids: Sequence[int],
                     payloads: Sequence[Any], *, num_kv_tokens: int | None = None) -> SessionInfo:
        """Store (or replace) a session durably: payloads[i] is the KV block i of
        token_ids[:num_kv_tokens] (default: all tokens). Blocks unchanged since the last save
        are not rewritten. Raises SwapFullError/SwapNoSpaceError/SwapIOError; the previous
        version stays intact then."""
        return self.finish(self.begin_save_session(session_id, owner_uid, token_ids, payloads,
                                                   num_kv_tokens=num_kv_tokens))

    def begin_save_session(self, session_id: str, owner_uid: int, token_ids: Sequence[int],
                           payloads: Sequence[Any], *, num_kv_tokens: int | None = None,
                           copy: bool = False) -> PendingCommit:
        """Start `save_session`; commit with `finish` (StoredSessions.begin_save)."""
        return self._sessions.begin_save(session_id, owner_uid, token_ids, payloads,
                                         num_kv_tokens=num_kv_tokens, copy=copy)

    def load_session(self, session_id: str, into: Sequence[Any]) -> SessionInfo:
        """StoredSessions.load."""
        return self._sessions.load(session_id, into)

    def session_info(self, session_id: str) -> SessionInfo:
        return self._sessions.info(session_id)

    def list_sessions(self, owner_uid: int | None = None) -> list[SessionInfo]:
        return self._sessions.infos(owner_uid)

    def delete_session(self, session_id: str) -> None:
        """StoredSessions.delete."""
        self._sessions.delete(session_id)

    def session_snapshot(self, session_id: str) -> Snapshot:
        """StoredSessions.snapshot."""
        return self._sessions.snapshot(session_id)

    def stage_blocks(self, payloads: Sequence[Any]) -> list[SlotRef]:
        """StoredSessions.stage."""
        return self._sessions.stage(payloads)

    def commit_staged_session(self, session_id: str, owner_uid: int, token_ids: Sequence[int],
                              num_kv_tokens: int, refs: Sequence[SlotRef],
                              created: float | None = None) -> SessionInfo:
        """StoredSessions.commit_staged."""
        return self._sessions.commit_staged(session_id, owner_uid, token_ids, num_kv_tokens,
                                            refs, created)

    # -- prefix blocks (PrefixTier) ------------------------------------------------------------

    def put_prefix_blocks(self, items: Sequence[tuple[bytes, Any]]) -> int:
        """Store (block hash, payload) pairs, parents first. Hashes already stored are only
        marked recently used. When space runs short the oldest prefix blocks are evicted and
        only the leading items that fit are stored. Returns how many new blocks were stored."""
        return self.finish(self.begin_put_prefix_blocks(items))

    def begin_put_prefix_blocks(self, items: Sequence[tuple[bytes, Any]]) -> PendingCommit:
        """Start `put_prefix_blocks`: the new blocks are written (at KV_WRITE_BACK) into staged
        slots, committed by `finish(pending)`; the payloads must stay unchanged until then.
        Their hashes count as pending (other puts skip them) until finish."""
        return self._prefixes.begin_put(items)

    def has_prefix_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many leading hashes are stored (no I/O)."""
        with self._lock:
            return self._prefixes.count_stored(hashes)

    def get_prefix_blocks(self, hashes: Sequence[bytes], into: Sequence[Any]) -> int:
        """Read the leading stored blocks of `hashes` into `into`; returns how many were read
        and verified (a miss, a corrupt or an unreadable block ends the run; corrupt entries
        are dropped; errors are counted, not raised, since a miss is the cache's answer)."""
        return self._prefixes.get(hashes, into)

    def get_prefix_block(self, block_hash: bytes, into: Any) -> bool:
        return self.get_prefix_blocks([block_hash], [into]) == 1

    def drop_prefix_blocks(self, hashes: Sequence[bytes]) -> int:
        """Forget stored prefix blocks (e.g. `rm -r` on the mount); returns how many."""
        return self._prefixes.drop(hashes)

    def list_prefixes(self) -> list[PrefixInfo]:
        return self._prefixes.infos()

    def prefix_info(self, block_hash: bytes) -> PrefixInfo:
        return self._prefixes.info(block_hash)

    def prefix_snapshot(self, block_hash: bytes) -> Snapshot:
        """Pin a prefix block for reading (release with `release_snapshot`)."""
        return self._prefixes.snapshot(block_hash)

    def adopt_prefix_scheme(self, scheme: str) -> int:
        """Record that prefix blocks are keyed by `scheme` from now on; every block stored
        under another (or no recorded) scheme is dropped, never served. Returns how many."""
        return self._prefixes.adopt_scheme(scheme)

    # -- snapshots for readers of the mount ----------------------------------------------------

    def release_snapshot(self, snap: Snapshot) -> None:
        with self._lock:
            self._slots.unpin(r.slot_id for r in snap.refs)

    # -- statistics -------------------------------------------------------------------------------

    def _bandwidth(self) -> dict[str, float]:
        """Device bandwidth: the I/O scheduler's busy-time figures once it has measured any
        (they exclude queueing and checksum time), else the per-batch averages."""
        bw = dict(self._bw)
        sched = self._store.scheduler
        if sched is not None:
            st = sched.statistics()
            for op, v in (("read", st.read_bandwidth), ("write", st.write_bandwidth)):
                if v > 0:
                    bw[op] = v
        return bw

    @property
    def slot_file(self) -> str:
        """The path of the slot file (for tools that attribute block I/O to it)."""
        return self._store.path

    def statistics(self) -> SwapStats:
        bw = self._bandwidth()
        with self._lock:
            slots = self._slots.statistics()
            kinds, prefixes = slots.owned, self._prefixes
            return SwapStats(
                path=self._store.path, direct_io=self._store.direct_io,
                model_id=self.layout.model_id, block_bytes=self.layout.block_bytes,
                slot_bytes=self._store.stride, capacity_slots=self._store.num_slots,
                free_slots=slots.unused, swap_slots=kinds.get("swap", 0),
                prefix_slots=kinds.get("prefix", 0), session_slots=kinds.get("session", 0),
                sessions=len(self._sessions),
                bytes_written=self._store.bytes_written, bytes_read=self._store.bytes_read,
                write_bandwidth=bw["write"], read_bandwidth=bw["read"],
                commit_seconds=self._commit_s, swap_outs=self._counts["swap_outs"],
                swap_ins=self._counts["swap_ins"], prefix_hits=prefixes.hits,
                prefix_misses=prefixes.misses, prefix_evictions=prefixes.evictions,
                errors=MappingProxyType(dict(self._errors)))

    def calibrate(self, nbytes: int = 16 << 20) -> None:
        """Measure write and read bandwidth on free slots (seeds the statistics)."""
        n = max(1, nbytes // self.layout.block_bytes)
        with self._lock:
            n = min(n, self._slots.num_free)
            if n == 0:
                return
            refs = self._allocate(n, "swap")
        try:
            with AlignedBuffer(n * self.layout.block_bytes) as buf:
                bb = self.layout.block_bytes
                views = [buf.view[i * bb:(i + 1) * bb] for i in range(n)]
                self._write(refs, views)
                self.read_refs(refs, views)
                del views
        except SwapError:
            pass  # counted and logged by _write / read_refs
        finally:
            with self._lock:
                self._slots.release_live(refs)
