"""Value types that cross the swapfs API: handles, session and prefix descriptions, and the
statistics snapshot. All frozen; none holds a reference into the store."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class SwapHandle:
    """A block swapped out for a preempted request: valid until freed or the process ends."""

    slot_id: int
    generation: int


@dataclass(frozen=True, slots=True)
class SlotRef:
    """One slot as a reader sees it: the generation it must carry and (when known) the
    payload checksum (swapfs.checksum)."""

    slot_id: int
    generation: int
    crc: int = 0


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session on flash. Its blocks hold the KV of token_ids[:num_kv_tokens]; block i holds
    tokens [i * block_size, (i + 1) * block_size) (the last block may be partly filled)."""

    session_id: str
    owner_uid: int
    token_ids: tuple[int, ...]
    num_kv_tokens: int
    num_blocks: int
    created: float
    last_used: float

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class PrefixInfo:
    """A prefix-cache block on flash, keyed by its chained block hash."""

    block_hash: bytes
    slot_id: int
    generation: int
    created: float
    last_used: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Slots pinned for reading (a session or a prefix block as it was when taken): they are
    not reused until `SwapSpace.release_snapshot`, even if the session is deleted meanwhile."""

    refs: tuple[SlotRef, ...]
    session: SessionInfo | None = None
    prefix: PrefixInfo | None = None


@dataclass(frozen=True, slots=True)
class SwapStats:
    """Snapshot of a SwapSpace.

    Bandwidths are bytes/s: an exponential average over batches of >= 1 MiB, seeded by a
    calibration at open (0.0 when nothing was measured). commit_seconds is the average time
    of one durable commit (fdatasync of the slot file plus the SQLite transaction).
    """

    path: str
    direct_io: bool
    model_id: str
    block_bytes: int
    slot_bytes: int
    capacity_slots: int
    free_slots: int
    swap_slots: int
    prefix_slots: int
    session_slots: int
    sessions: int
    bytes_written: int
    bytes_read: int
    write_bandwidth: float
    read_bandwidth: float
    commit_seconds: float
    swap_outs: int
    swap_ins: int
    prefix_hits: int
    prefix_misses: int
    prefix_evictions: int
    errors: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def used_slots(self) -> int:
        return self.capacity_slots - self.free_slots

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_slots * self.block_bytes

    @property
    def used_bytes(self) -> int:
        return self.used_slots * self.block_bytes

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["errors"] = dict(self.errors)
        d.update(used_slots=self.used_slots, capacity_bytes=self.capacity_bytes,
                 used_bytes=self.used_bytes)
        return d
