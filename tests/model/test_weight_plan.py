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
