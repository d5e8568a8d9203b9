"""WeightPlan: which segments stay resident and how many stream through a window.

Every step reads every segment once, in the same order: a cyclic scan. Under LRU (the page
cache, or any recency cache) a cyclic scan larger than the cache misses on every access,
because the segment evicted is always the one needed soonest; the optimal policy for a cycle
is to pin a fixed subset and stream the rest (Belady's MIN on a loop). So the plan pins as
many segments as fit beside a window of `window` slots (one being computed on, the others in
flight), and bytes read per step = streamed segments' bytes, nothing more.

A segment may take more bytes in memory than it reads from flash (the LM head's Q8_0 chunks
asked for in bfloat16 expand in place): a slot holds the largest segment's memory form, and the plan
pins first the segments that save the most reads per byte of memory (layers, read as they
are used), then the others in what room is left. Within each such class the pinned segments
are spread evenly over the cycle, so the reads of the streamed ones overlap the compute of
pinned ones instead of bunching up. The budget covers everything the pool holds: pinned
segments, window slots, the embedding rows' scratch and the final norm; it is rounded to the
2 MiB huge pages the arena is made of.
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
        slot_bytes: one slot (the largest segment's memory form, 4 KiB rounded).
        resident_bytes: pinned segments' 4 KiB-rounded memory bytes; fixed_bytes: scratch + norm.
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
    def make(cls, sizes: list[int], budget: int, *, fixed_bytes: int, window: int,
             memory: list[int] | None = None) -> WeightPlan:
        """Pin what fits beside a window of `window` slots (fewer if fewer segments stream).
        sizes: the bytes each segment reads from flash; memory: the bytes it takes in memory
        (>= sizes; default sizes). Raises ConfigError naming the minimum when even the window
        does not fit. Budgets of 4 MiB and more are planned in whole 2 MiB huge pages, smaller
        ones in 4 KiB pages."""
        granule = HUGE_PAGE if budget >= 2 * HUGE_PAGE else ALIGN
        memory = list(sizes) if memory is None else memory
        assert len(memory) == len(sizes) and all(m >= s for m, s in zip(memory, sizes))
        padded = [_round_up(m, ALIGN) for m in memory]
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
                              f"window (2 slots of {format_size(slot)}, the largest segment in "
                              f"memory, plus {format_size(fixed)}); raise --weight-budget to at "
                              f"least {format_size(minimum)}")
        while window > 2 and _round_up(window * slot + fixed, granule) > budget:
            window -= 1
        # The arena is rounded up to whole granules: keep the rounding inside the budget.
        room = (budget // granule) * granule - window * slot - fixed
        resident: list[int] = []
        for group in _by_saving(sizes, padded):   # the most reads saved per byte first
            picks = _pick(group, padded, room)
            resident += picks
            room -= sum(padded[i] for i in picks)
        resident = sorted(resident)
        streamed = tuple(i for i in range(len(sizes)) if i not in set(resident))
        window = min(window, len(streamed)) or 1
        rbytes = sum(padded[i] for i in resident)
        arena = _round_up(rbytes + window * slot + fixed, granule)
        assert arena <= budget
        return cls(tuple(resident), streamed, window, slot, rbytes, fixed, arena,
                   sum(sizes[i] for i in streamed))


def _by_saving(sizes: list[int], padded: list[int]) -> list[list[int]]:
    """Segment indices grouped by the flash bytes pinning one saves per byte of memory (to
    two decimals: a layer's 4 KiB rounding does not split the layers), best group first."""
    groups: dict[float, list[int]] = {}
    for i, (s, p) in enumerate(zip(sizes, padded)):
        groups.setdefault(round(s / p, 2) if p else 1.0, []).append(i)
    return [groups[k] for k in sorted(groups, reverse=True)]


def _pick(group: list[int], padded: list[int], room: int) -> list[int]:
    """As many of `group` as fit in `room` (counted smallest first), spread evenly over it,
    then what still fits of the rest."""
    count, used = 0, 0
    for i in sorted(group, key=lambda i: padded[i]):
        if used + padded[i] > room:
            break
        used += padded[i]
        count += 1
    picks = [group[k] for k in _spread(len(group), count, [padded[i] for i in group], room)]
    # segments of two sizes in one group (layers and Q8_0 head chunks): evenly spaced picks
    # may leave room a smaller one fits in; fill it, smallest first
    left = room - sum(padded[i] for i in picks)
    for i in sorted((i for i in group if i not in set(picks)), key=lambda i: padded[i]):
        if padded[i] > left:
            break
        picks.append(i)
        left -= padded[i]
    return picks


def _spread(n: int, count: int, padded: list[int], room: int) -> tuple[int, ...]:
    """`count` indices spread evenly over range(n) whose bytes fit in `room` (dropping the
    largest picks until they do, as evenly spaced picks may be larger than the smallest)."""
    if count <= 0:
        return ()
    picks = sorted({int((k + 0.5) * n / count) for k in range(count)})
    while picks and sum(padded[i] for i in picks) > room:
        picks.remove(max(picks, key=lambda i: padded[i]))
    return tuple(picks)
