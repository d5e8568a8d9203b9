"""WeightPlan: which segments stay resident and how many stream through a window.

Every step reads every segment once, in the same order: a cyclic scan. Under LRU (the page
cache, or any recency cache) a cyclic scan larger than the cache misses on every access,
because the segment evicted is always the one needed soonest; the optimal policy for a cycle
is to pin a fixed subset and stream the rest (Belady's MIN on a loop). So the plan pins as
many segments as fit beside a window of `window` slots (one being computed on, the others in
flight), and bytes read per step = streamed segments' bytes, nothing more.

Pinned segments are spread evenly over the cycle, so the reads of the streamed ones overlap
the compute of pinned ones instead of bunching up. The budget covers everything the pool
holds: pinned segments, window slots, the embedding rows' scratch and the final norm; it is
rounded to the 2 MiB huge pages the arena is made of.
Prior art: "LLM in a Flash" (Alizadeh et al. 2023, windowing), PowerInfer-2's pinned hot set.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvmm_daemon.errors import ConfigError
from kvmm_daemon.sizes import format_size

ALIGN = 4096
HUGE_PAGE = 2 << 20
MAX_WINDOW = 4


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass(frozen=True, slots=True)
class WeightPlan:
    """Attributes:
        resident: indices of pinned segments (ascending); streamed: the others, in step order.
        window: slots the streamed segments cycle through (0 when nothing streams).
        slot_bytes: one slot (the largest streamed segment, 4 KiB rounded).
        resident_bytes: pinned segments' 4 KiB-rounded bytes; fixed_bytes: scratch + norm.
        arena_bytes: everything, 2 MiB rounded; <= the budget (invariant).
    """

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    window: int
    slot_bytes: int
    resident_bytes: int
    fixed_bytes: int
    arena_bytes: int
    streamed_bytes: int          # bytes read per step (segments' data bytes)

    @property
    def huge_pages(self) -> bool:
        return self.arena_bytes % HUGE_PAGE == 0

    @classmethod
    def make(cls, sizes: list[int], budget: int, *, fixed_bytes: int, window: int) -> WeightPlan:
        """Pin what fits beside a window of `window` slots (fewer if fewer segments stream).
        Raises ConfigError naming the minimum when even the window does not fit. Budgets of
        4 MiB and more are planned in whole 2 MiB huge pages, smaller ones in 4 KiB pages."""
        granule = HUGE_PAGE if budget >= 2 * HUGE_PAGE else ALIGN
        padded = [_round_up(s, ALIGN) for s in sizes]
        fixed = _round_up(fixed_bytes, ALIGN)
        if _round_up(sum(padded) + fixed, granule) <= budget:
            return cls(tuple(range(len(sizes))), (), 0, 0, sum(padded), fixed,
                       _round_up(sum(padded) + fixed, granule), 0)
        slot = max(padded)
        window = max(1, min(window, len(sizes)))
        minimum = _round_up(min(2, len(sizes)) * slot + fixed, ALIGN)
        if minimum >= 2 * HUGE_PAGE:
            minimum = _round_up(minimum, HUGE_PAGE)
        if budget < minimum:
            raise ConfigError(f"weight budget of {format_size(budget)} cannot hold the streaming "
                              f"window (2 segments of {format_size(slot)} plus {format_size(fixed)}); "
                              f"raise --weight-budget to at least {format_size(minimum)}")
        while window > 2 and _round_up(window * slot + fixed, granule) > budget:
            window -= 1
        # The arena is rounded up to whole granules: keep the rounding inside the budget.
        room = (budget // granule) * granule - window * slot - fixed
        count = 0
        order = sorted(range(len(sizes)), key=lambda i: padded[i])
        used = 0
        for i in order:                       # how many fit (smallest first maximises count)
            if used + padded[i] > room:
                break
            used += padded[i]
            count += 1
        resident = _spread(len(sizes), count, padded, room)
        streamed = tuple(i for i in range(len(sizes)) if i not in set(resident))
        window = min(window, len(streamed)) or 1
        rbytes = sum(padded[i] for i in resident)
        arena = _round_up(rbytes + window * slot + fixed, granule)
        assert arena <= budget
        return cls(resident, streamed, window, slot, rbytes, fixed, arena,
                   sum(sizes[i] for i in streamed))


def _spread(n: int, count: int, padded: list[int], room: int) -> tuple[int, ...]:
    """`count` indices spread evenly over range(n) whose bytes fit in `room` (dropping the
    largest picks until they do, as evenly spaced picks may be larger than the smallest)."""
    if count <= 0:
        return ()
    picks = sorted({int((k + 0.5) * n / count) for k in range(count)})
    while picks and sum(padded[i] for i in picks) > room:
        picks.remove(max(picks, key=lambda i: padded[i]))
    return tuple(picks)
