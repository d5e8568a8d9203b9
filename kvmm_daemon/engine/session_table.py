"""Sessions: KV kept between the turns of a conversation.

When a session's turn finishes its sequence is *parked*: its blocks stay allocated and the
history (prompt + completion) is remembered, so the next turn appends its tokens and only
those are computed. With a flash tier every parked turn is also written through to swapfs
(incrementally, committed a step or more later: see FlashTier), which makes it durable
(restarts, kill -9) and lets memory be released once committed:
after `session_idle_s`, or under pressure (the scheduler's `release_idle`, oldest first).
A session whose memory was released is loaded back at its next turn's admission.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from kvmm_daemon.engine.sequence import Sequence
from kvmm_daemon.kv.kv_manager import KVCacheManager


@dataclass(slots=True)
class Session:
    """Invariants: seq_id is not None iff the session holds parked KV for token_ids[:-1]
    (the last token's KV is computed by the next turn); busy iff a request of this session
    is in flight (then the request owns the sequence and seq_id is None); on_flash iff the
    current history's KV is committed in swapfs (set by the deferred save's completion)."""

    session_id: str
    owner: object
    token_ids: list[int]
    seq_id: int | None = None
    busy: bool = False
    last_used: float = 0.0
    on_flash: bool = False


class SessionTable(dict):
    """session id -> Session, with the moves between memory and flash. Mechanism only:
    the engine and scheduler decide when to park, release or delete."""

    def __init__(self, kv: KVCacheManager, tier) -> None:
        super().__init__()
        self.kv = kv
        self.tier = tier      # FlashTier or None

    def load_stored(self) -> None:
        """Register every session committed on flash (at start)."""
        if self.tier is None:
            return
        for info in self.tier.stored_sessions():
            self[info.session_id] = Session(info.session_id, info.owner_uid, list(info.token_ids),
                                            last_used=time.monotonic(), on_flash=True)

    def get_or_create(self, session_id: str, owner: object) -> Session:
        """The session, found in memory, else on flash (e.g. imported through the mount
        while running), else new and empty."""
        s = self.get(session_id)
        if s is None and self.tier is not None and self.tier.has_session(session_id):
            info = self.tier.swap.session_info(session_id)
            s = Session(session_id, info.owner_uid, list(info.token_ids), on_flash=True)
        if s is None:
            s = Session(session_id, owner, [])
        s.last_used = time.monotonic()
        self[session_id] = s
        return s

    def park(self, session_id: str | None, seq: Sequence) -> bool:
        """Keep a finished turn's KV for the next turn (and write it through to flash).
        True if the sequence's blocks now belong to the session."""
        s = self.get(session_id) if session_id else None
        if s is None:
            return False
        s.busy = False
        s.token_ids = list(seq.token_ids)
        s.last_used = time.monotonic()
        s.on_flash = False
        if self.kv.num_tokens(seq.seq_id) != len(seq.token_ids) - 1:
            return False
        s.seq_id = seq.seq_id
        if self.tier is not None:
            owner = s.owner if isinstance(s.owner, int) else 0
            saved = tuple(s.token_ids)

            def committed(ok: bool) -> None:     # later, when the deferred write completes
                s.on_flash = ok and tuple(s.token_ids) == saved
            self.tier.save_session(s.session_id, owner, s.token_ids, s.seq_id, on_done=committed)
        return True

    def _release(self, s: Session) -> None:
        self.kv.free(s.seq_id)
        s.seq_id = None

    def release_oldest(self) -> bool:
        """Free the memory of the least recently used parked session. False if none."""
        parked = [s for s in self.values() if s.seq_id is not None and not s.busy]
        if not parked:
            return False
        self._release(min(parked, key=lambda s: s.last_used))
        return True

    def offload_idle(self, idle_s: float) -> None:
        """Free the memory of sessions idle longer than idle_s whose KV is on flash or being
        written there from a copy (the next turn's admission waits for that commit; if it
        fails, the turn recomputes what is missing)."""
        limit = time.monotonic() - idle_s
        for s in self.values():
            if s.seq_id is not None and not s.busy and s.last_used <= limit and \
                    (s.on_flash or self.tier.saving(s.session_id)):
                self._release(s)

    def delete(self, session_id: str) -> None:
        """Drop a session everywhere (its in-flight turn must be finished first)."""
        s = self.pop(session_id)
        assert not s.busy, "finish the session's request before deleting it"
        if s.seq_id is not None:
            self.kv.free(s.seq_id)
        if self.tier is not None:
            self.tier.delete_session(session_id)
