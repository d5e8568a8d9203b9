"""ViewHooks: what the daemon behind the swapfs view wants to hear of and decide.

The view changes the store directly (an import commits a session, `rm` deletes one), but
the engine keeps its own table of sessions and the daemon its quotas; without telling them,
an `rm -r` would leave the engine reusing (and writing back) the deleted history, and an
import would not count against its owner. The view calls these at the matching moments;
each is optional, so the stand-alone mount (`python -m swapfs.fuse_mount`) needs none.

  import_policy      what imported token ids and history lengths must satisfy
  import_allowed     (uid, sessions, swap bytes) -> None, or raises OSError with
                     EDQUOT/ENOSPC: may `uid` add that many sessions and bytes (its imports
                     being written, this one included)? Called when an import is created and
                     once its header announces its size
  session_deleted    async (session id): delete it in the engine (aborting a running turn)
                     before the view drops what is left in the store
  session_imported   async (session id): the import is committed; show it in the engine
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from swapfs.import_check import ImportPolicy


@dataclass(frozen=True, slots=True)
class ViewHooks:
    import_policy: ImportPolicy = field(default_factory=ImportPolicy)
    import_allowed: Callable[[int, int, int], None] | None = None
    session_deleted: Callable[[str], Awaitable[None]] | None = None
    session_imported: Callable[[str], Awaitable[None]] | None = None
