"""SlotMap: which slot of the slot file holds what, and which slot may be handed out next.

The swap area's bookkeeping in one place, apart from the I/O and the metadata: a slot is
free, owned (by a kind of content, with the generation written into its header and the
payload checksum), or released while a reader still has it pinned (deferred: it becomes
free when its last pin goes). Durable content goes through "staged": written but named by
no committed metadata, so a crash leaves it free; `commit` turns it into a session or
prefix block once the metadata that names it is committed.

Mechanism only, as kvmm_daemon/kv/block_pool.py: `allocate` returns None when short and
never evicts; whom to evict (the least recently used prefix blocks) is SwapSpace's call.
Not thread-safe: the owner calls it under its lock. Prior art: Linux swap's swap_map
(a count per slot, a free cluster search), vLLM's BlockPool.
"""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from swapfs.records import SlotRef

KINDS = ("swap", "staged", "session", "prefix")
ALLOCATED_KINDS = ("swap", "staged")     # what `allocate` hands out
COMMITTED_KINDS = ("session", "prefix")  # what `commit` makes of a staged slot


@dataclass(slots=True)
class _Owned:
    kind: str
    generation: int
    crc: int = 0


@dataclass(frozen=True, slots=True)
class SlotMapStats:
    """capacity = free + deferred + sum(owned.values()); pinned counts distinct slots."""

    capacity: int
    free: int
    deferred: int
    pinned: int
    owned: Mapping[str, int]

    @property
    def unused(self) -> int:
        """Slots that hold nothing anyone may still use (free now or once unpinned)."""
        return self.free + self.deferred


class SlotMap:
    """Attributes and their invariants:
      num_slots: slots 0..num_slots-1; each is in exactly one of `_owned`, `_free` and
        `_deferred`.
      _owned: slot -> _Owned(kind, generation, crc) for every slot holding content; kind is
        one of KINDS.
      _free: the free slots as a min-heap (so a batch gets low, mostly consecutive slots,
        which the store writes as one request); no slot twice; never a pinned slot.
      _deferred: slots released while pinned; every one has a pin count > 0.
      _pins: slot -> readers in flight, every count > 0; a pinned slot is owned or deferred,
        so a slot being read is never handed out.
      _next_gen: greater than every generation handed out or loaded; generations of owned
        slots are distinct, so a reader holding a SlotRef of a slot since reused sees a
        mismatch (a slot's header carries its generation).
    """

    def __init__(self, num_slots: int,
                 used: Mapping[int, tuple[str, int, int]] = MappingProxyType({})) -> None:
        """`used`: slot -> (kind, generation, crc) of the slots committed metadata names."""
        if num_slots < 1:
            raise ValueError(f"a slot map needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self._owned: dict[int, _Owned] = {}
        for slot, (kind, gen, crc) in used.items():
            if not 0 <= slot < num_slots or kind not in COMMITTED_KINDS or gen < 1:
                raise ValueError(f"stored slot {slot} ({kind}, generation {gen}) does not fit"
                                 f" a swap area of {num_slots} slots")
            self._owned[slot] = _Owned(kind, gen, crc)
        if len({o.generation for o in self._owned.values()}) != len(self._owned):
            raise ValueError("two stored slots carry the same generation")
        self._free = [s for s in range(num_slots) if s not in self._owned]  # sorted: a heap
        self._deferred: set[int] = set()
        self._pins: Counter[int] = Counter()
        self._next_gen = max((o.generation for o in self._owned.values()), default=0) + 1

    # -- queries --------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Slots `allocate` can hand out now."""
        return len(self._free)

    @property
    def num_owned(self) -> int:
        return len(self._owned)

    def kind(self, slot: int) -> str | None:
        """The kind of content in `slot`, None when it holds none (free or deferred)."""
        owned = self._owned.get(slot)
        return owned.kind if owned is not None else None

    def ref(self, slot: int) -> SlotRef:
        """The owned slot as a reader needs it (generation and checksum); KeyError if free."""
        owned = self._owned[slot]
        return SlotRef(slot, owned.generation, owned.crc)

    def is_live(self, ref: SlotRef, kind: str | None = None) -> bool:
        """`ref` still names its slot's content (of `kind`, when given): not released since."""
        owned = self._owned.get(ref.slot_id)
        return owned is not None and owned.generation == ref.generation and \
            (kind is None or owned.kind == kind)

    def is_pinned(self, slot: int) -> bool:
        return slot in self._pins

    def statistics(self) -> SlotMapStats:
        return SlotMapStats(self.num_slots, len(self._free), len(self._deferred), len(self._pins),
                            MappingProxyType(Counter(o.kind for o in self._owned.values())))

    # -- changes --------------------------------------------------------------------------

    def allocate(self, n: int, kind: str) -> list[SlotRef] | None:
        """Take `n` free slots (lowest first) for new content of `kind` ("swap" or "staged"),
        each with a new generation; None, and nothing taken, when fewer are free."""
        if kind not in ALLOCATED_KINDS:
            raise ValueError(f"slots are allocated as {ALLOCATED_KINDS}, not {kind!r}")
        if n > len(self._free):
            return None
        refs = []
        for _ in range(n):
            slot = heapq.heappop(self._free)
            assert slot not in self._owned and slot not in self._pins
            self._owned[slot] = _Owned(kind, self._next_gen)
            refs.append(SlotRef(slot, self._next_gen))
            self._next_gen += 1
        return refs

    def set_crc(self, slot: int, crc: int) -> None:
        """Record the payload checksum written into an owned slot."""
        self._owned[slot].crc = crc

    def commit(self, slots: Iterable[int], kind: str) -> None:
        """Staged slots become `kind` ("session" or "prefix"): committed metadata names them."""
        if kind not in COMMITTED_KINDS:
            raise ValueError(f"staged slots are committed as {COMMITTED_KINDS}, not {kind!r}")
        for slot in slots:
            owned = self._owned[slot]
            if owned.kind != "staged":
                raise ValueError(f"slot {slot} holds {owned.kind} content, not staged content")
            owned.kind = kind

    def release(self, slots: Iterable[int]) -> None:
        """Owned slots hold nothing any more: free at once, or when their last pin goes."""
        for slot in slots:
            del self._owned[slot]
            if slot in self._pins:
                self._deferred.add(slot)
            else:
                heapq.heappush(self._free, slot)

    def release_live(self, refs: Iterable[SlotRef], kind: str | None = None) -> list[int]:
        """Release the slots of the refs that are still live (see `is_live`), ignoring the
        others (released already, maybe reused); returns the slots released."""
        live = list(dict.fromkeys(r.slot_id for r in refs if self.is_live(r, kind)))
        self.release(live)
        return live

    def pin(self, slots: Iterable[int]) -> None:
        """A reader starts on owned slots: none is handed out again until `unpin`."""
        for slot in slots:
            if slot not in self._owned:
                raise KeyError(f"slot {slot} holds nothing; only an owned slot can be pinned")
            self._pins[slot] += 1

    def unpin(self, slots: Iterable[int]) -> None:
        for slot in slots:
            if slot not in self._pins:
                raise KeyError(f"slot {slot} is not pinned")
            self._pins[slot] -= 1
            if not self._pins[slot]:
                del self._pins[slot]
                if slot in self._deferred:
                    self._deferred.discard(slot)
                    heapq.heappush(self._free, slot)

    # -- checking -------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert every invariant of the class docstring (for tests; O(num_slots))."""
        free = set(self._free)
        owned = set(self._owned)
        assert len(free) == len(self._free), "a slot is in the free heap twice"
        assert not (free & owned) and not (free & self._deferred) and \
            not (owned & self._deferred), "a slot is in two of free, owned, deferred"
        assert free | owned | self._deferred == set(range(self.num_slots)), "a slot is lost"
        assert all(self._free[i] <= self._free[c] for i in range(len(self._free))
                   for c in (2 * i + 1, 2 * i + 2) if c < len(self._free)), "not a heap"
        assert all(n > 0 for n in self._pins.values()), "a pin count is not positive"
        assert not (set(self._pins) & free), "a pinned slot is free"
        assert self._deferred <= set(self._pins), "a deferred slot has no pin"
        gens = [o.generation for o in self._owned.values()]
        assert len(set(gens)) == len(gens), "two owned slots share a generation"
        assert all(0 < g < self._next_gen for g in gens), "a generation not below _next_gen"
        assert all(o.kind in KINDS for o in self._owned.values()), "an unknown kind"
