"""Metadata: the crash-safe index of the slot file, in SQLite (WAL mode, synchronous=FULL).

Tables:
  meta(key, value)           layout (KVLayout JSON), num_slots, payload_bytes
  slots(slot_id, generation, kind, crc)            a row exists iff the slot holds committed
                                                   data of a prefix block or a session block
  prefixes(hash, slot_id, created, last_used)      prefix-cache blocks by chained hash
  sessions(session_id, owner_uid, token_ids, num_kv_tokens, created, last_used)
  session_blocks(session_id, idx, slot_id)         the session's blocks in order
  tags(key, value)           facts about the content that do not change the layout (e.g.
                             the prefix hash scheme its prefix blocks were stored under)
crc is the slot's u64 payload checksum (stored as signed INTEGER). Every change is one
transaction, and the caller commits only after fdatasync of the slot data it references,
so after a SIGKILL or power loss at any instant the database is either the old or the new
state and every slot it names holds the data it was committed with.
Slots of preempted requests (kind "swap") are never recorded: they die with the process.

Prior art: s3ql's SQLite metadata, Firefox's WAL-mode stores. Left out: schema migration
(a format change bumps FORMAT_VERSION, which changes the layout id and drops the store).
"""
from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from swapfs.errors import SwapIOError, SwapNoSpaceError

log = logging.getLogger("kvmm.swapfs")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slots(
  slot_id INTEGER PRIMARY KEY, generation INTEGER NOT NULL,
  kind TEXT NOT NULL CHECK(kind IN ('prefix', 'session')), crc INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS prefixes(
  hash BLOB PRIMARY KEY, slot_id INTEGER NOT NULL UNIQUE REFERENCES slots(slot_id),
  created REAL NOT NULL, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions(
  session_id TEXT PRIMARY KEY, owner_uid INTEGER NOT NULL, token_ids BLOB NOT NULL,
  num_kv_tokens INTEGER NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS session_blocks(
  session_id TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
  idx INTEGER NOT NULL, slot_id INTEGER NOT NULL UNIQUE REFERENCES slots(slot_id),
  PRIMARY KEY(session_id, idx));
CREATE TABLE IF NOT EXISTS tags(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class SlotRecord:
    slot_id: int
    generation: int
    crc: int


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_id: str
    owner_uid: int
    token_ids: tuple[int, ...]
    num_kv_tokens: int
    created: float
    last_used: float
    blocks: tuple[SlotRecord, ...]


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<i4").tobytes()


def unpack_tokens(blob: bytes) -> tuple[int, ...]:
    return tuple(np.frombuffer(blob, dtype="<i4").tolist())


class Metadata:
    """One SQLite connection; not thread-safe by itself (SwapSpace serializes calls)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            if _is_io(exc):
                raise _typed(exc, f"opening swap metadata {path}") from exc
            log.error("swap metadata %s is unreadable (%s); starting with an empty swap space",
                      path, exc)
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.unlink(path + suffix)
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        db.execute("PRAGMA quick_check").fetchone()
        return db

    def close(self) -> None:
        self._db.close()

    def _tx(self, what: str, statements: Iterable[tuple[str, Sequence | Iterable]]) -> None:
        """Run (sql, params) statements as one transaction; params may be a list of rows."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    if params and isinstance(params, list):
                        self._db.executemany(sql, params)
                    elif params != []:
                        self._db.execute(sql, params)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (FULL)
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the first error is the one to report
                raise
        except sqlite3.Error as exc:
            raise _typed(exc, what) from exc

    # -- identity ---------------------------------------------------------------------------

    def identity(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def reset(self, identity: dict[str, str]) -> None:
        """Drop every record and set the store's identity (layout, geometry)."""
        stmts = [(f"DELETE FROM {t}", ()) for t in
                 ("session_blocks", "sessions", "prefixes", "slots", "meta")]
        stmts.append(("INSERT INTO meta(key, value) VALUES (?, ?)", list(identity.items())))
        self._tx("resetting swap metadata", stmts)

    # -- reading ----------------------------------------------------------------------------

    def used_slots(self) -> dict[int, tuple[int, str, int]]:
        """slot_id -> (generation, kind, crc) of every committed slot."""
        rows = self._db.execute("SELECT slot_id, generation, kind, crc FROM slots")
        return {s: (g, k, c & _U64) for s, g, k, c in rows}

    def prefixes(self) -> list[tuple[bytes, int, float, float]]:
        """(hash, slot_id, created, last_used), least recently used first."""
        return self._db.execute("SELECT hash, slot_id, created, last_used FROM prefixes"
                                " ORDER BY last_used, rowid").fetchall()

    def session(self, session_id: str) -> SessionRow | None:
        row = self._db.execute("SELECT session_id, owner_uid, token_ids, num_kv_tokens, created,"
                               " last_used FROM sessions WHERE session_id = ?",
                               (session_id,)).fetchone()
        if row is None:
            return None
        blocks = self._db.execute(
            "SELECT s.slot_id, s.generation, s.crc FROM session_blocks b JOIN slots s"
            " ON s.slot_id = b.slot_id WHERE b.session_id = ? ORDER BY b.idx", (session_id,))
        return SessionRow(row[0], row[1], unpack_tokens(row[2]), row[3], row[4], row[5],
                          tuple(SlotRecord(s, g, c & _U64) for s, g, c in blocks))

    def session_ids(self, owner_uid: int | None = None) -> list[str]:
        if owner_uid is None:
            rows = self._db.execute("SELECT session_id FROM sessions ORDER BY session_id")
        else:
            rows = self._db.execute("SELECT session_id FROM sessions WHERE owner_uid = ?"
                                    " ORDER BY session_id", (owner_uid,))
        return [r[0] for r in rows]

    def tag(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM tags WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # -- writing ----------------------------------------------------------------------------

    def retag_prefixes(self, key: str, value: str, removed: Sequence[tuple[bytes, int]]) -> None:
        """Drop (hash, slot_id) prefix entries and set tag `key` in one transaction."""
        self._tx("retagging prefix blocks", [
            ("DELETE FROM prefixes WHERE hash = ?", [(h,) for h, _s in removed]),
            ("DELETE FROM slots WHERE slot_id = ?", [(s,) for _h, s in removed]),
            ("INSERT OR REPLACE INTO tags(key, value) VALUES (?, ?)", [(key, value)]),
        ])

    def commit_prefixes(self, added: Sequence[tuple[bytes, SlotRecord, float]],
                        removed: Sequence[tuple[bytes, int]],
                        touched: Sequence[tuple[bytes, float]]) -> None:
        """Add (hash, slot, now) entries, drop (hash, slot_id) entries, update last_used."""
        self._tx("committing prefix blocks", [
            ("DELETE FROM prefixes WHERE hash = ?", [(h,) for h, _s in removed]),
            ("DELETE FROM slots WHERE slot_id = ?", [(s,) for _h, s in removed]),
            ("INSERT INTO slots(slot_id, generation, kind, crc) VALUES (?, ?, 'prefix', ?)",
             [(r.slot_id, r.generation, _i64(r.crc)) for _h, r, _t in added]),
            ("INSERT INTO prefixes(hash, slot_id, created, last_used) VALUES (?, ?, ?, ?)",
             [(h, r.slot_id, t, t) for h, r, t in added]),
            ("UPDATE prefixes SET last_used = ? WHERE hash = ?", [(t, h) for h, t in touched]),
        ])

    def commit_session(self, row: SessionRow, new: Sequence[SlotRecord],
                       freed: Sequence[int]) -> None:
        """Create or replace a session with its blocks: `new` are the blocks written for this
        commit (the others are kept from the old version), `freed` the old slots not kept."""
        sid = row.session_id
        self._tx(f"committing session {sid!r}", [
            ("DELETE FROM session_blocks WHERE session_id = ?", (sid,)),
            ("DELETE FROM slots WHERE slot_id = ?", [(s,) for s in freed]),
            ("INSERT OR REPLACE INTO sessions(session_id, owner_uid, token_ids, num_kv_tokens,"
             " created, last_used) VALUES (?, ?, ?, ?, ?, ?)",
             (sid, row.owner_uid, pack_tokens(row.token_ids), row.num_kv_tokens, row.created,
              row.last_used)),
            ("INSERT INTO slots(slot_id, generation, kind, crc) VALUES (?, ?, 'session', ?)",
             [(b.slot_id, b.generation, _i64(b.crc)) for b in new]),
            ("INSERT INTO session_blocks(session_id, idx, slot_id) VALUES (?, ?, ?)",
             [(sid, i, b.slot_id) for i, b in enumerate(row.blocks)]),
        ])

    def delete_session(self, session_id: str, slots: Sequence[int]) -> None:
        self._tx(f"deleting session {session_id!r}", [
            ("DELETE FROM sessions WHERE session_id = ?", (session_id,)),
            ("DELETE FROM slots WHERE slot_id = ?", [(s,) for s in slots]),
        ])

    def touch_session(self, session_id: str, now: float) -> None:
        self._tx(f"touching session {session_id!r}", [
            ("UPDATE sessions SET last_used = ? WHERE session_id = ?", (now, session_id))])


_U64 = (1 << 64) - 1


def _i64(checksum: int) -> int:
    """A u64 checksum as SQLite's signed 64-bit INTEGER (read back with `& _U64`)."""
    return checksum - (1 << 64) if checksum >= 1 << 63 else checksum


def _is_io(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_IOERR,
                                                         sqlite3.SQLITE_FULL,
                                                         sqlite3.SQLITE_CANTOPEN)


def _typed(exc: sqlite3.Error, what: str):
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return SwapNoSpaceError(f"{what}: the swap metadata file system is full ({exc}); free"
                                " space under --swap-dir")
    return SwapIOError(f"{what}: swap metadata failed ({exc}); check the device under"
                       " --swap-dir")
