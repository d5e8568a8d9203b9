"""SessionEvictor: whose sessions leave flash when the swap area is full.

Sessions are never evicted by swapfs (only prefix blocks are a cache); when a session save
or an import finds every slot taken by sessions and swapped blocks, somebody's stored
sessions must go, and it must not be the uid that stayed within its means. The fair share
of each uid is the swap capacity divided among the uids that hold sessions (or the
configured per-uid quota when that is smaller); the uid furthest over its share loses its
least recently used *idle* session (no turn in flight), one per call.

Policy only: it reads the session table and the swap statistics and names a victim; the
engine deletes it. Prior art: the "largest over its share first" rule of Linux's memcg
reclaim (memory.low/high) and of fair-share schedulers.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Victim:
    session_id: str
    owner: object
    over_share_bytes: int


def pick_victim(sessions, stored: list, capacity_bytes: int, block_bytes: int,
                quota_bytes: int | None = None) -> Victim | None:
    """The oldest idle session of the uid most over its share of the swap area, or None.

    sessions: the engine's SessionTable (session id -> Session with owner, busy, last_used);
    stored: swapfs SessionInfo of every session on flash (owner_uid, num_blocks)."""
    used: dict[object, int] = defaultdict(int)
    for info in stored:
        used[info.owner_uid] += info.num_blocks * block_bytes
    if not used:
        return None
    share = capacity_bytes // len(used)
    if quota_bytes is not None:
        share = min(share, quota_bytes)
    ranked = sorted(used, key=lambda u: used[u] - share, reverse=True)
    for uid in [u for u in ranked if used[u] > share] or ranked[:1]:
        on_flash = {i.session_id for i in stored if i.owner_uid == uid}
        idle = [s for sid, s in sessions.items() if sid in on_flash and not s.busy]
        if idle:
            oldest = min(idle, key=lambda s: s.last_used)
            return Victim(oldest.session_id, uid, used[uid] - share)
    return None
