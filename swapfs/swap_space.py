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
is being rewritten; the slot header's generation catches everything else.

The sync API is thread-safe and blocking (call it from the engine's worker thread; from
trio use `swapfs.trio_api.TrioSwapSpace`). Every failure is a typed `SwapError`, counted in
`statistics().errors` by kind and logged at ERROR once per kind. Prior art: vLLM's
swap_in/swap_out block mappings, LMCache's local-disk tier. Left out: compression,
deduplication of session blocks against prefix blocks.
"""
from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from iosched.aligned_buffer import AlignedBuffer
from swapfs.block_buffer import BlockBuffer
from swapfs.errors import (SwapConfigError, SwapConflictError, SwapError, SwapFullError,
                           SwapNotFoundError, from_os_error)
from swapfs.layout import KVLayout
from swapfs.metadata import Metadata
from swapfs.pending_commit import PendingCommit
from swapfs.records import Snapshot, SlotRef, SwapHandle, SwapStats
from swapfs.prefix_tier import PrefixMethods
from swapfs.stored_sessions import SessionMethods
from iosched import IOScheduler
from swapfs.slot_store import SUPER_BYTES, PendingWrite, SlotStore, slot_stride

log = logging.getLogger("kvmm.swapfs")

SLOT_FILE = "kvmm-swap.slots"
META_FILE = "kvmm-swap.sqlite"
_EWMA = 0.3


def _ewma(old: float, sample: float) -> float:
    return sample if old == 0.0 else (1 - _EWMA) * old + _EWMA * sample


@dataclass(slots=True)
class _Slot:
    kind: str          # "swap" | "prefix" | "session" | "staged" (written, not committed)
    generation: int
    crc: int = 0


class SwapSpace(PrefixMethods, SessionMethods):
    """Attributes (all guarded by `_lock`):
      _owner: slot_id -> _Slot for every slot not free; a slot is in exactly one of `_owner`,
        `_free` (a min-heap, so batches get consecutive slots) or `_deferred` (released
        while pinned; joins `_free` when its pin count drops to zero).
      _pins: slot_id -> readers in flight; a pinned slot is never handed out.
      _prefix: hash -> slot_id, least recently used first; every slot in it is kind prefix.
      _prefix_times: hash -> (created, last_used); `_touched` hashes whose last_used is not
        yet persisted (flushed with the next prefix commit and at close).
      _pending_hashes: prefix hashes being written by some thread (skipped by other puts).
      _sessions: session_id -> its slot ids in block order (mirror of the metadata).
    `_session_lock` serializes session writes/deletes so a save can keep the unchanged blocks
    of the previous version without pinning them.
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
        self._session_lock = threading.Lock()
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
        self._owner = {s: _Slot(k, g, c) for s, (g, k, c) in used.items()}
        self._free = [s for s in range(num_slots) if s not in self._owner]
        self._deferred: set[int] = set()
        self._pins: Counter[int] = Counter()
        self._next_gen = max((g for g, _k, _c in used.values()), default=0) + 1
        self._prefix: OrderedDict[bytes, int] = OrderedDict()
        self._prefix_times: dict[bytes, tuple[float, float]] = {}
        for h, slot, created, last_used in self._meta.prefixes():
            self._prefix[h] = slot
            self._prefix_times[h] = (created, last_used)
        self._touched: set[bytes] = set()
        self._pending_hashes: set[bytes] = set()
        self._sessions: dict[str, tuple[int, ...]] = {}
        for sid in self._meta.session_ids():
            row = self._meta.session(sid)
            self._sessions[sid] = tuple(b.slot_id for b in row.blocks)

    def close(self) -> None:
        with self._lock:
            try:
                self._flush_touched()
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
        if len(self._free) < n:
            self._evict_prefixes(n - len(self._free))
        if len(self._free) < n:
            if not partial:
                raise SwapFullError(
                    f"swap space full: {len(self._owner)} of {self._store.num_slots} slots hold"
                    f" sessions and swapped blocks, {n} more needed; raise --swap-size or delete"
                    " sessions")
            n = len(self._free)
        refs = []
        for _ in range(n):
            slot = heapq.heappop(self._free)
            assert slot not in self._owner and not self._pins[slot]
            self._owner[slot] = _Slot(kind, self._next_gen)
            refs.append(SlotRef(slot, self._next_gen))
            self._next_gen += 1
        return refs

    def _release(self, slots: Sequence[int]) -> None:
        for slot in slots:
            del self._owner[slot]
            if self._pins[slot]:
                self._deferred.add(slot)
            else:
                heapq.heappush(self._free, slot)

    def _pin(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self._pins[slot] += 1

    def _unpin(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self._pins[slot] -= 1
            assert self._pins[slot] >= 0
            if not self._pins[slot]:
                del self._pins[slot]
                if slot in self._deferred:
                    self._deferred.discard(slot)
                    heapq.heappush(self._free, slot)

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
                self._release([r.slot_id for r in refs])
            self._record(exc)
            raise

    def _end_write(self, refs: Sequence[SlotRef], pending: PendingWrite) -> list[int]:
        """Wait for a `_begin_write`; its checksums (kept with the slots). On failure the
        slots are released and the error recorded and raised."""
        try:
            crcs = self._store.finish_write(pending)
        except SwapError as exc:
            with self._lock:
                self._release([r.slot_id for r in refs if (s := self._owner.get(r.slot_id))
                               is not None and s.generation == r.generation])
            self._record(exc)
            raise
        self._measure("write", len(refs) * self.layout.block_bytes,
                      time.perf_counter() - pending.started)
        with self._lock:
            for r, crc in zip(refs, crcs):
                self._owner[r.slot_id].crc = crc
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
                    pending.result = self._finish_session(pending)
                else:
                    pending.result = self._finish_prefix(pending)
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
                s = self._owner.get(h.slot_id)
                if s is None or s.kind != "swap" or s.generation != h.generation:
                    raise SwapNotFoundError(f"swap handle {h} is not live (freed already?)")
            self._pin(slots)
        try:
            results = self.read_refs([SlotRef(h.slot_id, h.generation) for h in handles], into)
        finally:
            with self._lock:
                self._unpin(slots)
                if release:
                    self._release(slots)
                self._counts["swap_ins"] += len(slots)
        for exc in results:
            if exc is not None:
                raise exc

    def free(self, handles: Sequence[SwapHandle]) -> None:
        """Free swapped blocks; handles already freed are ignored."""
        with self._lock:
            live = [h.slot_id for h in handles if (s := self._owner.get(h.slot_id)) is not None
                    and s.kind == "swap" and s.generation == h.generation]
            self._release(live)

    # -- snapshots for readers of the mount ----------------------------------------------------

    def release_snapshot(self, snap: Snapshot) -> None:
        with self._lock:
            self._unpin([r.slot_id for r in snap.refs])

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

    def statistics(self) -> SwapStats:
        bw = self._bandwidth()
        with self._lock:
            kinds = Counter(s.kind for s in self._owner.values())
            return SwapStats(
                path=self._store.path, direct_io=self._store.direct_io,
                model_id=self.layout.model_id, block_bytes=self.layout.block_bytes,
                slot_bytes=self._store.stride, capacity_slots=self._store.num_slots,
                free_slots=len(self._free) + len(self._deferred),
                swap_slots=kinds["swap"], prefix_slots=kinds["prefix"],
                session_slots=kinds["session"], sessions=len(self._sessions),
                bytes_written=self._store.bytes_written, bytes_read=self._store.bytes_read,
                write_bandwidth=bw["write"], read_bandwidth=bw["read"],
                commit_seconds=self._commit_s, swap_outs=self._counts["swap_outs"],
                swap_ins=self._counts["swap_ins"], prefix_hits=self._counts["prefix_hits"],
                prefix_misses=self._counts["prefix_misses"],
                prefix_evictions=self._counts["prefix_evictions"],
                errors=MappingProxyType(dict(self._errors)))

    def calibrate(self, nbytes: int = 16 << 20) -> None:
        """Measure write and read bandwidth on free slots (seeds the statistics)."""
        n = max(1, nbytes // self.layout.block_bytes)
        with self._lock:
            n = min(n, len(self._free))
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
                self._release([r.slot_id for r in refs if (s := self._owner.get(r.slot_id))
                               is not None and s.generation == r.generation])
