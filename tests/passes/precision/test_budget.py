"""The budget solver: optimal against brute force, clear when infeasible, deterministic on ties,
quick on a model-sized instance."""
import itertools
import math
import os
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimfx.passes.precision.budget import BudgetInfeasible, fits, solve_avg_bits, solve_budget


def _brute_force(costs, sizes, limit):
    """(least cost, smallest size) over every assignment that fits, or None."""
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        size = math.fsum(s[j] for s, j in zip(sizes, choice))
        if fits(size, limit):
            cost = math.fsum(c[j] for c, j in zip(costs, choice))
            best = cost if best is None else min(best, cost)
    return best


def _totals(costs, sizes, choice):
    return (math.fsum(c[j] for c, j in zip(costs, choice)), math.fsum(s[j] for s, j in zip(sizes, choice)))


# Small integers make exact ties and limits hit exactly; the extremes probe HiGHS's tolerances
# (a cost 1e6 times the others is a layer whose outputs explode at int2).
_values = st.one_of(st.integers(0, 20).map(float), st.floats(0, 100),
                    st.sampled_from([1.0 + 1e-10, 3e-12, 1e9, 1e9 + 1, 2e6, 1e12]))


@st.composite
def instances(draw):
    """Up to 5 items x 3 options; the limit anywhere from below the smallest total to above the
    largest (often exactly on a reachable total)."""
    n = draw(st.integers(1, 5))
    widths = [draw(st.integers(1, 3)) for _ in range(n)]
    costs = [[draw(_values) for _ in range(k)] for k in widths]
    sizes = [[draw(_values) for _ in range(k)] for k in widths]
    totals = sorted(math.fsum(s[j] for s, j in zip(sizes, ch))
                    for ch in itertools.product(*(range(k) for k in widths)))
    limit = draw(st.one_of(st.sampled_from(totals), st.floats(totals[0] - 5, totals[-1] + 5)))
    return costs, sizes, limit


@given(instances())
def test_optimal_against_brute_force(instance):
    costs, sizes, limit = instance
    best = _brute_force(costs, sizes, limit)
    if best is None:
        with pytest.raises(BudgetInfeasible) as info:
            solve_budget(costs, sizes, limit)
        assert info.value.smallest_achievable == pytest.approx(math.fsum(min(s) for s in sizes))
        return
    choice = solve_budget(costs, sizes, limit)
    assert len(choice) == len(costs) and all(0 <= j < len(c) for j, c in zip(choice, costs))
    cost, size = _totals(costs, sizes, choice)
    assert fits(size, limit)
    # Within rounding of the optimum: it was allowed 1e-6 of the largest per-item cost step (HiGHS's
    # absolute gap on costs scaled to 1), which let a huge cost hide every small one (12× the optimum).
    assert cost <= best + 1e-9 * max(1.0, abs(best))


def test_a_huge_cost_beside_small_ones_does_not_hide_them():
    """Two ordinary layers and one whose int2 costs 2e6: at avg_bits<=6 the solver put both
    ordinary layers at int2 (cost 1.501) where int4 for both fits (0.12)."""
    costs = [[0.001, 0.05, 0.9], [0.001, 0.06, 0.95], [0.01, 0.6, 2e6]]
    choice = solve_avg_bits(costs, [4096] * 3, [8.25, 4.5, 2.5], 6.0)
    assert choice == [1, 1, 0]
    assert solve_avg_bits(costs, [4096] * 3, [8.25, 4.5, 2.5], 5.0) == [1, 1, 1]


def test_an_item_left_only_its_large_option_does_not_crowd_the_others_out_of_the_room():
    """Pruning fixed the huge item at its large option; sizes were still scaled by the room before
    it, and HiGHS's slack kept returning assignments a byte over the limit (RuntimeError)."""
    costs = [[1e12, 0], [2000, 0], [.836, .028], [.767, .607], [.722, .445], [.591, .102], [.031, .025]]
    sizes = [[1, 1e9 + 1], [1, 2], [0, 2], [0, 3], [0, 1], [0, 2], [0, 3]]
    limit = 1e9 + 3
    choice = solve_budget(costs, sizes, limit)
    cost, size = _totals(costs, sizes, choice)
    assert fits(size, limit) and cost == pytest.approx(_brute_force(costs, sizes, limit), abs=1e-12)


def test_the_budget_binds_on_the_cheapest_tradeoff():
    costs = [[0.0, 1.0, 9.0], [0.0, 5.0, 6.0], [0.0, 0.5, 50.0]]
    sizes = [[8.0, 4.0, 2.0]] * 3
    assert solve_budget(costs, sizes, 24) == [0, 0, 0]
    assert solve_budget(costs, sizes, 16) == [1, 0, 1]
    assert solve_budget(costs, sizes, 13) == [1, 1, 1]
    assert solve_budget(costs, sizes, 10) == [1, 2, 1]


def test_infeasible_says_the_smallest_achievable():
    with pytest.raises(BudgetInfeasible, match="of 9 cannot be met: the smallest achievable is 10") as info:
        solve_budget([[0, 1], [0, 1]], [[8, 5], [6, 5]], 9)
    assert info.value.smallest_achievable == 10 and info.value.limit == 9
    assert isinstance(info.value, ValueError)


def test_ties_are_deterministic():
    # Equal cost: the smaller size wins; equal cost and size: the lower index wins.
    assert solve_budget([[1.0, 1.0, 1.0]], [[5.0, 3.0, 3.0]], 10) == [1]
    assert solve_budget([[2.0, 2.0], [2.0, 2.0]], [[4.0, 4.0], [4.0, 4.0]], 8) == [0, 0]
    costs = [[0.0, 1.0]] * 6
    sizes = [[2.0, 1.0]] * 6  # any three of six items may shrink: many optimal answers
    answers = {tuple(solve_budget(costs, sizes, 9.0)) for _ in range(5)}
    assert len(answers) == 1 and sum(next(iter(answers))) == 3


def test_avg_bits_budget():
    costs = [[0.0, 3.0, 30.0], [0.0, 1.0, 10.0]]
    counts = [100, 300]
    bits = [8.03, 4.25, 2.5]
    assert solve_avg_bits(costs, counts, bits, 8.1) == [0, 0]
    assert solve_avg_bits(costs, counts, bits, 6.0) == [0, 1]
    per_target = [[8.03, 4.25, 2.5], [8.1, 4.5, 2.75]]  # e.g. a ragged group costs more
    assert solve_avg_bits(costs, counts, per_target, 4.5) == [1, 1]
    message = "of 2 bits/weight cannot be met: the smallest achievable is 2.5 bits/weight"
    with pytest.raises(BudgetInfeasible, match=message) as info:
        solve_avg_bits(costs, counts, bits, 2.0)
    assert info.value.smallest_achievable == pytest.approx(2.5)


@pytest.mark.parametrize("args, match", [
    (([[1.0]], [[1.0], [2.0]], 5), "costs has 1 items but sizes has 2"),
    (([[1.0, 2.0]], [[1.0]], 5), "item 0: 2 costs and 1 sizes"),
    (([[]], [[]], 5), "item 0: 0 costs"),
    (([], [], 5), "no items"),
    (([[math.nan]], [[1.0]], 5), "finite"),
    (([[1.0]], [[1.0]], math.inf), "finite"),
])
def test_bad_input_says_what_to_do(args, match):
    with pytest.raises(ValueError, match=match):
        solve_budget(*args)


def test_avg_bits_bad_input():
    with pytest.raises(ValueError, match="bits has 1 rows but there are 2 targets"):
        solve_avg_bits([[0.0], [0.0]], [1, 1], [[8.0]], 8.0)
    with pytest.raises(ValueError, match="positive total"):
        solve_avg_bits([[0.0]], [0], [8.0], 8.0)


def test_model_sized_instance_is_quick():
    """300 targets x 3 formats (SmolLM2-135M has 210 Linears) at a binding budget."""
    rng = random.Random(0)
    counts = [rng.randint(10_000, 3_000_000) for _ in range(300)]
    costs = []
    for _ in range(300):
        e = rng.uniform(1e-6, 1e-2)
        costs.append([e, e * rng.uniform(10, 20), e * rng.uniform(100, 400)])
    start = time.perf_counter()
    choice = solve_avg_bits(costs, counts, [8.03, 4.25, 2.5], 5.4)
    elapsed = time.perf_counter() - start
    bits = math.fsum([8.03, 4.25, 2.5][j] * n for j, n in zip(choice, counts)) / sum(counts)
    assert bits <= 5.4 + 1e-9 and len(set(choice)) == 3
    # Typically 0.1-0.5 s; the bound only catches a blow-up (timings belong in benchmarks/).
    assert elapsed < 5.0, f"{elapsed:.2f} s"


def test_native_writes_to_stdout_are_silenced_inside_and_restored_after(capfd):
    """HiGHS writes debugging lines to file descriptor 1 from C++; the solver runs with it pointed
    at /dev/null, and Python's own stdout works again afterwards."""
    from slimfx.passes.precision.budget import native_stdout_silenced

    with native_stdout_silenced():
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution\n")
    os.write(1, b"after\n")
    print("printed")
    out = capfd.readouterr().out
    assert "HighsMipSolverData" not in out and "after" in out and "printed" in out
