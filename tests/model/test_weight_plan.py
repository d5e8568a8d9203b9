import pytest

from kvmm_daemon.errors import ConfigError
from kvmm_daemon.model.weight_plan import HUGE_PAGE, WeightPlan

MiB = 1 << 20


def test_everything_pinned_when_it_fits():
    plan = WeightPlan.make([MiB] * 10, 64 * MiB, fixed_bytes=256 * 1024, window=3)
    assert plan.streamed == () and plan.window == 0 and plan.streamed_bytes == 0
    assert plan.resident == tuple(range(10))
    assert plan.arena_bytes <= 64 * MiB and plan.arena_bytes % HUGE_PAGE == 0


@pytest.mark.parametrize("budget_mib", [7, 8, 13, 22, 40])
def test_budget_holds_and_pinned_are_spread(budget_mib):
    sizes = [2 * MiB + 4096 * (i % 3) for i in range(30)]
    budget = budget_mib * MiB
    plan = WeightPlan.make(sizes, budget, fixed_bytes=300_000, window=3)
    assert plan.arena_bytes <= budget
    assert plan.resident_bytes + plan.window * plan.slot_bytes + plan.fixed_bytes <= plan.arena_bytes
    assert sorted(plan.resident + plan.streamed) == list(range(30))
    assert plan.streamed_bytes == sum(sizes[i] for i in plan.streamed)
    assert plan.window >= 2
    if len(plan.resident) >= 2:          # spread over the cycle, not bunched at one end
        gaps = [b - a for a, b in zip(plan.resident, plan.resident[1:])]
        assert max(gaps) - min(gaps) <= 30 // len(plan.resident) + 1


def test_more_budget_never_reads_more():
    sizes = [MiB * (1 + i % 4) for i in range(40)]
    reads = [WeightPlan.make(sizes, b * MiB, fixed_bytes=0, window=3).streamed_bytes for b in range(10, 120, 6)]
    assert reads == sorted(reads, reverse=True)


def test_too_small_is_refused_with_the_minimum():
    with pytest.raises(ConfigError, match=r"raise --weight-budget to at least 6 MiB"):
        WeightPlan.make([2 * MiB] * 10, 3 * MiB, fixed_bytes=100, window=3)


def test_small_budgets_are_planned_in_base_pages():
    plan = WeightPlan.make([20_000] * 8, 100_000, fixed_bytes=8192, window=3)
    assert plan.arena_bytes <= 100_000 and not plan.huge_pages and plan.streamed


def test_slots_hold_the_memory_form_and_layers_are_pinned_before_expanding_chunks():
    """SmolLM2's shape: 30 layers read as they are used, 28 head chunks that read 1.1 MB and
    take 2 MiB in memory once expanded. Pinning a layer saves twice the reads of a chunk."""
    layer, chunk_read, chunk_mem = 2_216_448, 1_096_704, 2_064_384
    sizes = [layer] * 30 + [chunk_read] * 28
    memory = [layer] * 30 + [chunk_mem] * 28
    for budget_mib in (22, 46, 80, 100):
        plan = WeightPlan.make(sizes, budget_mib * MiB, fixed_bytes=300_000, window=3, memory=memory)
        assert plan.arena_bytes <= budget_mib * MiB
        assert plan.slot_bytes == max(-(-m // 4096) * 4096 for m in memory)
        pinned_chunks = [i for i in plan.resident if i >= 30]
        assert not pinned_chunks or all(i in plan.resident for i in range(30))
        assert plan.streamed_bytes == sum(sizes[i] for i in plan.streamed)
        assert plan.resident_bytes == sum(-(-memory[i] // 4096) * 4096 for i in plan.resident)
    plan = WeightPlan.make(sizes, 100 * MiB, fixed_bytes=300_000, window=3, memory=memory)
    assert 30 < len(plan.resident) < 58           # every layer and some chunks


def test_the_refusal_names_slots_of_the_memory_form():
    with pytest.raises(ConfigError, match=r"2 slots of 4 MiB, the largest segment in memory.*"
                                          r"at least 10 MiB"):
        WeightPlan.make([MiB] * 10, 6 * MiB, fixed_bytes=100, window=3, memory=[4 * MiB] * 10)
