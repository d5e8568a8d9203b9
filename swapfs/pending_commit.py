"""PendingCommit: a durable write of swapfs that was submitted and not yet committed.

`SwapSpace.begin_save_session` and `begin_put_prefix_blocks` allocate staged slots, copy
the payloads into a staging buffer of their own when asked (so the caller may reuse its KV
blocks at once) and submit the writes at KV_WRITE_BACK priority, then return. The commit
(`SwapSpace.finish`) waits for the writes and verifies they all landed, fdatasyncs the slot
file and only then commits the metadata in one SQLite transaction, so a crash at any
instant leaves the metadata pointing at the previous, complete version: staged slots that
no commit names are free after a restart. Prior art: s3ql's block cache uploads (dirty
blocks written in the background, the metadata updated on completion), the ext4 ordered
journal mode (data before the metadata that points at it).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from iosched.aligned_buffer import AlignedBuffer
from swapfs.block_buffer import BlockBuffer
from swapfs.records import SlotRef
from swapfs.slot_store import PendingWrite


@dataclass(eq=False)
class PendingCommit:
    """Attributes:
      kind: "session" or "prefix"; refs: the staged slots being written (owned by nobody
        in the metadata until the commit); write: their PendingWrite (None when there was
        nothing new to write).
      staging: the copy of the payloads being written, closed by finish (None when the
        caller's buffers are written in place and must stay unchanged until finish).
      session: for a session save, (session_id, owner_uid, token ids, num_kv_tokens, the
        metadata row the save started from or None, blocks kept from it).
      prefix: for a prefix put, [(hash, payload index)] of the new blocks, and `now`.
      result: None until finished; then the SessionInfo / count, or the SwapError.
    Invariant: result is not None iff finish ran (the staged slots are committed or freed).
    """
    kind: str
    refs: list[SlotRef]
    write: PendingWrite | None
    staging: AlignedBuffer | None = None
    session: tuple | None = None
    prefix: list[bytes] = field(default_factory=list)
    now: float = 0.0
    result: Any = None

    def done(self) -> bool:
        """The writes have ended: finish will not wait for the device (it still syncs)."""
        return self.write is None or self.write.done()


def copy_to_staging(views: Sequence[BlockBuffer],
                    block_bytes: int) -> tuple[AlignedBuffer | None, list[memoryview]]:
    """The payloads copied into one O_DIRECT-ready buffer, and its per-block views."""
    if not views:
        return None, []
    buf = AlignedBuffer(len(views) * block_bytes)
    out = []
    for i, v in enumerate(views):
        dst = buf.view[i * block_bytes:(i + 1) * block_bytes]
        v.gather_into(dst)
        out.append(dst)
    return buf, out
