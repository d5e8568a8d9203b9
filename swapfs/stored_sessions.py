"""StoredSessions: the persistent sessions of a SwapSpace.

A session on flash is (owner uid, token ids, num_kv_tokens, blocks in order). Saving again
is incremental: the leading full blocks whose tokens did not change are kept as they are
and only the rest is written (KV of a full block depends only on the tokens up to its end).
A load that meets a corrupt block truncates the stored session before it, so the next save
rewrites it, and raises with `blocks_loaded` set, so the engine recomputes only the tail.
Import (the FUSE /import directory) stages blocks as they arrive and commits at the end.

A part of SwapSpace, composed rather than mixed in: it owns the session lock and the
in-memory list of sessions and uses the space's lock, metadata, SlotMap and slot I/O
(`_views`, `_allocate`, `_begin_write`, `_end_write`, `read_refs`, `_commit`, `_record`).
"""
from __future__ import annotations

import time
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from swapfs.errors import (SessionExistsError, SlotCorruptError, SwapConflictError, SwapError,
                           SwapNotFoundError)
from swapfs.metadata import SessionRow, SlotRecord
from swapfs.pending_commit import PendingCommit, copy_to_staging
from swapfs.records import SessionInfo, Snapshot, SlotRef

if TYPE_CHECKING:
    from swapfs.swap_space import SwapSpace


def check_session_id(session_id: str) -> None:
    """Session ids become directory names on the mount: no '/', no NUL, not '.' or '..'."""
    if not isinstance(session_id, str) or not session_id or session_id in (".", "..") \
            or "/" in session_id or "\0" in session_id or len(session_id.encode()) > 255:
        raise ValueError(f"session id {session_id!r} is not usable: give 1-255 bytes without"
                         " '/' or NUL, not '.' or '..'")


def _info(row: SessionRow) -> SessionInfo:
    return SessionInfo(row.session_id, row.owner_uid, row.token_ids, row.num_kv_tokens,
                       len(row.blocks), row.created, row.last_used)


class StoredSessions:
    """Attributes:
      _session_lock: serializes session writes and deletes (taken before the space's
        `_lock`), so a save can keep the unchanged blocks of the previous version without
        pinning them.
      _slots_of: session_id -> its slot ids in block order, for exactly the sessions the
        committed metadata holds; every slot in it is of kind "session" in the SlotMap
        (guarded by `_lock`, the space's).
    """

    def __init__(self, space: SwapSpace) -> None:
        self._space = space
        self._lock = space._lock
        self._meta = space._meta
        self._slots = space._slots
        self._layout = space.layout
        self._session_lock = threading.Lock()
        self._slots_of: dict[str, tuple[int, ...]] = {}
        for sid in self._meta.session_ids():
            self._slots_of[sid] = tuple(b.slot_id for b in self._meta.session(sid).blocks)

    def __len__(self) -> int:
        return len(self._slots_of)

    def begin_save(self, session_id: str, owner_uid: int, token_ids: Sequence[int],
                   payloads: Sequence[Any], *, num_kv_tokens: int | None = None,
                   copy: bool = False) -> PendingCommit:
        """SwapSpace.begin_save_session: the changed blocks are written (at KV_WRITE_BACK)
        into staged slots and nothing is committed until `finish(pending)`. With `copy` the
        blocks to write are copied first, so the caller may change its buffers at once; else
        they must stay unchanged until finish. If the stored session changes in between (deleted,
        imported, saved by another call), finish discards this save and raises."""
        check_session_id(session_id)
        tokens = tuple(int(t) for t in token_ids)
        nkv = len(tokens) if num_kv_tokens is None else int(num_kv_tokens)
        bs = self._layout.block_size
        if not 0 <= nkv <= len(tokens) or len(payloads) != self._layout.blocks_for(nkv):
            raise ValueError(f"session {session_id!r}: {nkv} KV tokens of {len(tokens)} fill"
                             f" {self._layout.blocks_for(nkv)} blocks of {bs} tokens, got"
                             f" {len(payloads)} payloads")
        with self._session_lock:
            with self._lock:
                old = self._meta.session(session_id)
            keep = 0
            if old is not None and old.owner_uid == owner_uid:
                common = 0
                limit = min(old.num_kv_tokens, nkv)
                while common < limit and old.token_ids[common] == tokens[common]:
                    common += 1
                keep = min(common // bs, len(old.blocks))
            refs, write, staging = self._begin_stage(payloads[keep:], copy=copy)
            return PendingCommit("session", refs, write, staging,
                                 session=(session_id, owner_uid, tokens, nkv, old, keep))

    def finish_save(self, p: PendingCommit) -> SessionInfo:
        """The commit half of SwapSpace.finish for a session save."""
        session_id, owner_uid, tokens, nkv, old, keep = p.session
        if p.write is not None:
            self._space._end_write(p.refs, p.write)
        with self._session_lock:
            with self._lock:
                now_row = self._meta.session(session_id)
            if (now_row.blocks if now_row else None) != (old.blocks if old else None):
                raise SwapConflictError(f"session {session_id!r} changed on flash while this"
                                        " save was being written; the save is dropped and the"
                                        " next turn writes the session again")
            now = time.time()
            new = self._staged_records(p.refs)
            row = SessionRow(session_id, owner_uid, tokens, nkv,
                             old.created if old else now, now,
                             (old.blocks[:keep] if old else ()) + tuple(new))
            freed = [b.slot_id for b in old.blocks[keep:]] if old else []
            self._space._commit(self._commit_session_row, row, new, freed)
            return _info(row)

    def _commit_session_row(self, row: SessionRow, new: Sequence[SlotRecord],
                            freed: Sequence[int]) -> None:
        self._meta.commit_session(row, new, freed)
        self._slots.commit([rec.slot_id for rec in new], "session")
        self._slots.release(freed)
        self._slots_of[row.session_id] = tuple(b.slot_id for b in row.blocks)

    def load(self, session_id: str, into: Sequence[Any]) -> SessionInfo:
        """Read every block of the session into into[0..num_blocks). On a bad block raises
        SlotCorruptError/SwapIOError with `blocks_loaded` = the leading blocks that are valid
        in `into`. Raises SwapNotFoundError for an unknown id."""
        with self._lock:
            row = self._row(session_id)
            if len(into) < len(row.blocks):
                raise ValueError(f"session {session_id!r} has {len(row.blocks)} blocks, only"
                                 f" {len(into)} destination buffers given")
            slots = [b.slot_id for b in row.blocks]
            self._slots.pin(slots)
        try:
            results = self._space.read_refs(
                [SlotRef(b.slot_id, b.generation) for b in row.blocks], into[:len(row.blocks)])
        finally:
            with self._lock:
                self._slots.unpin(slots)
        bad = next((i for i, e in enumerate(results) if e is not None), None)
        if bad is not None:
            exc = results[bad]
            exc.blocks_loaded = bad
            if isinstance(exc, SlotCorruptError):
                self._truncate(row, bad)
            raise exc
        with self._lock:
            try:
                self._meta.touch_session(session_id, time.time())
            except SwapError as err:
                self._space._record(err)
            return _info(self._row(session_id))

    def _truncate(self, row: SessionRow, nblocks: int) -> None:
        """Drop blocks [nblocks:] of a session found corrupt (if it did not change since)."""
        with self._session_lock:
            with self._lock:
                now = self._meta.session(row.session_id)
            if now is None or now.blocks != row.blocks:
                return
            nkv = min(row.num_kv_tokens, nblocks * self._layout.block_size)
            short = SessionRow(row.session_id, row.owner_uid, row.token_ids, nkv, row.created,
                               row.last_used, row.blocks[:nblocks])
            try:
                with self._lock:
                    self._commit_session_row(short, [], [b.slot_id for b in row.blocks[nblocks:]])
            except SwapError as exc:
                self._space._record(exc)

    def _row(self, session_id: str) -> SessionRow:
        row = self._meta.session(session_id)
        if row is None:
            raise SwapNotFoundError(f"session {session_id!r} is not stored on flash")
        return row

    def info(self, session_id: str) -> SessionInfo:
        with self._lock:
            return _info(self._row(session_id))

    def infos(self, owner_uid: int | None = None) -> list[SessionInfo]:
        with self._lock:
            return [_info(self._meta.session(sid)) for sid in self._meta.session_ids(owner_uid)]

    def delete(self, session_id: str) -> None:
        """Drop a session and free its slots (readers holding a snapshot finish first)."""
        with self._session_lock, self._lock:
            row = self._row(session_id)
            slots = [b.slot_id for b in row.blocks]
            try:
                self._meta.delete_session(session_id, slots)
            except SwapError as exc:
                self._space._record(exc)
                raise
            self._slots.release(slots)
            del self._slots_of[session_id]

    def snapshot(self, session_id: str) -> Snapshot:
        """Pin a session's blocks for reading (release with `release_snapshot`)."""
        with self._lock:
            row = self._row(session_id)
            self._slots.pin([b.slot_id for b in row.blocks])
            return Snapshot(tuple(SlotRef(b.slot_id, b.generation, b.crc) for b in row.blocks),
                            session=_info(row))

    # -- staged writes (save, import) ------------------------------------------------------

    def stage(self, payloads: Sequence[Any]) -> list[SlotRef]:
        """Write blocks into fresh slots that belong to nobody until a commit names them
        (a crash before it leaves them free). Discard with `discard_staged`."""
        refs, write, _staging = self._begin_stage(payloads, copy=False)
        if write is not None:
            self._space._end_write(refs, write)
        return refs

    def _begin_stage(self, payloads: Sequence[Any], *, copy: bool):
        """Allocate staged slots for `payloads` and submit their writes (copied first with
        `copy`); (refs, PendingWrite or None when there is nothing, staging or None)."""
        views = self._space._views(payloads, writable=False)
        if not views:
            return [], None, None
        with self._lock:
            try:
                refs = self._space._allocate(len(views), "staged")
            except SwapError as exc:
                self._space._record(exc)
                raise
        staging = None
        if copy:
            staging, views = copy_to_staging(views, self._layout.block_bytes)
        try:
            return refs, self._space._begin_write(refs, views), staging
        except BaseException:
            if staging is not None:
                staging.close()
            raise

    def _staged_records(self, refs: Sequence[SlotRef]) -> list[SlotRecord]:
        with self._lock:
            return [SlotRecord(r.slot_id, r.generation, self._slots.ref(r.slot_id).crc)
                    for r in refs]

    def commit_staged(self, session_id: str, owner_uid: int, token_ids: Sequence[int],
                      num_kv_tokens: int, refs: Sequence[SlotRef],
                      created: float | None = None) -> SessionInfo:
        """Commit staged blocks as a new session; raises SessionExistsError if the id is
        taken (the staged blocks are left to the caller to discard)."""
        check_session_id(session_id)
        tokens = tuple(int(t) for t in token_ids)
        if not 0 <= num_kv_tokens <= len(tokens) or \
                len(refs) != self._layout.blocks_for(num_kv_tokens):
            raise ValueError(f"session {session_id!r}: {num_kv_tokens} KV tokens need"
                             f" {self._layout.blocks_for(num_kv_tokens)} blocks, got"
                             f" {len(refs)}")
        with self._session_lock:
            with self._lock:
                if self._meta.session(session_id) is not None:
                    raise SessionExistsError(f"session {session_id!r} exists already; delete it"
                                             " first or import under another name")
            now = time.time()
            new = self._staged_records(refs)
            row = SessionRow(session_id, owner_uid, tokens, num_kv_tokens,
                             created if created is not None else now, now, tuple(new))
            self._space._commit(self._commit_session_row, row, new, [])
            return _info(row)
