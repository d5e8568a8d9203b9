"""SessionLedger: per-uid session counts and stored bytes, counted at admission.

The engine's session list is a snapshot taken at the end of each step, so a check against it
lets a client that pipelines opens (or generates naming new sessions) past the limit before
the next step. The ledger is updated synchronously, on the event loop, at the moment a
session is admitted (open, a generate that creates it, an import created through the view)
and when one is deleted; the snapshot only *removes* entries it has had a full step to see
(sessions the engine evicted), never adds headroom for ones it has not seen yet.

Counted per uid: sessions (`max_sessions_per_uid`) and bytes of stored session KV
(`swap_quota_per_uid`, from the sessions' token counts). Imports count with the imports of
that uid still being written. Mechanism for the daemon's admission: it answers and counts,
the callers decide what to refuse and how (LIMIT_EXCEEDED on the socket, EDQUOT in the view).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Callable

from kvmm_daemon.daemon.session_directory import owner_of


@dataclass(frozen=True, slots=True)
class QuotaStatistics:
    max_sessions_per_uid: int
    swap_quota_per_uid: int | None
    sessions: dict                   # uid -> sessions counted


class SessionLedger:
    """Attributes and invariants:
      _owner: engine session id -> uid, for every session admitted and not deleted (the
        engine holds it, or will once it applies the queued open).
      _since: engine session id -> engine steps completed when it was admitted; the snapshot
        may drop an entry only after a later step completed.
    """

    def __init__(self, engine: Any, steps: Callable[[], int], *, max_sessions: int,
                 quota_bytes: int | None, block_bytes: int, block_size: int):
        self.engine, self.steps = engine, steps
        self.max_sessions, self.quota_bytes = max_sessions, quota_bytes
        self.block_bytes, self.block_size = block_bytes, block_size
        self._owner: dict[str, int] = {}
        self._since: dict[str, int] = {}
        for s in engine.list_sessions():
            self._owner[s.session_id] = owner_of(s.session_id)
            self._since[s.session_id] = -1

    def _reconcile(self) -> dict[str, Any]:
        """Drop sessions the engine no longer holds (deleted or evicted) per its snapshot."""
        snap = {s.session_id: s for s in self.engine.list_sessions()}
        done = self.steps()
        for sid in [sid for sid in self._owner if sid not in snap and self._since[sid] < done - 1]:
            del self._owner[sid], self._since[sid]
        return snap

    def sessions_of(self, uid: int) -> int:
        self._reconcile()
        return sum(1 for u in self._owner.values() if u == uid)

    def bytes_of(self, uid: int) -> int:
        snap = self._reconcile()
        blocks = sum(-(-snap[sid].num_tokens // self.block_size) for sid, u in self._owner.items()
                     if u == uid and sid in snap)
        return blocks * self.block_bytes

    def room_for(self, uid: int, sessions: int = 1, nbytes: int = 0) -> str | None:
        """None if `uid` may add `sessions` sessions holding `nbytes` more bytes, else why not."""
        held = self.sessions_of(uid)
        if held + sessions > self.max_sessions:
            return (f"uid {uid} has {held} sessions, the limit (max_sessions_per_uid) is "
                    f"{self.max_sessions}; delete one with kvmm sessions rm ID")
        if self.quota_bytes is not None and nbytes:
            used = self.bytes_of(uid)
            if used + nbytes > self.quota_bytes:
                return (f"uid {uid} stores {used} bytes of sessions; {nbytes} more exceed its "
                        f"quota of {self.quota_bytes} (swap_quota_per_uid); delete a session")
        return None

    def add(self, engine_id: str) -> None:
        """Count a session from now on (admitted, or committed by an import)."""
        self._owner.setdefault(engine_id, owner_of(engine_id))
        self._since[engine_id] = self.steps()

    def forget(self, engine_id: str) -> None:
        self._owner.pop(engine_id, None)
        self._since.pop(engine_id, None)

    def __contains__(self, engine_id: str) -> bool:
        return engine_id in self._owner

    def check_import(self, uid: int, sessions: int, nbytes: int) -> None:
        """The view's import_allowed hook: OSError(EDQUOT) when over a quota."""
        why = self.room_for(uid, sessions, nbytes)
        if why is not None:
            raise OSError(errno.EDQUOT, why)

    def statistics(self) -> QuotaStatistics:
        self._reconcile()
        counts: dict[int, int] = {}
        for u in self._owner.values():
            counts[u] = counts.get(u, 0) + 1
        return QuotaStatistics(self.max_sessions, self.quota_bytes, counts)
