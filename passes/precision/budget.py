"""The mixed-precision budget solver: one format per target, least total sensitivity, within a size.

`precision … choose {…} budget avg_bits<=6 by output_mse` measures each target's cost (e.g.
`gptq.output_error`) and size for every candidate format, then asks `solve_budget` (or
`solve_avg_bits`) for the assignment: a multiple-choice knapsack, solved exactly with scipy's
`milp` (HiGHS). Pure numbers in, option indices out.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

__all__ = ["BudgetInfeasible", "solve_budget", "solve_avg_bits", "fits"]

REL_TOL = 1e-9  # sums of floats are compared to the limit with this much slack
_MAX_CUTS = 20
# Costs go to HiGHS scaled so that the largest is this: its absolute optimality gap is 1e-6 (not
# settable through scipy), which on costs scaled to 1 hid differences under 1e-6 of the largest.
_COST_SCALE = 1e6


class BudgetInfeasible(ValueError):
    """No assignment fits: even every target at its smallest option exceeds the limit.
    `smallest_achievable` is that smallest total (in the caller's unit)."""

    def __init__(self, smallest_achievable: float, limit: float, unit: str = ""):
        self.smallest_achievable = smallest_achievable
        self.limit = limit
        super().__init__(f"the budget of {limit:g}{unit} cannot be met: the smallest achievable is "
                         f"{smallest_achievable:g}{unit} (every target at its smallest format); "
                         "raise the limit or offer smaller formats")


def fits(total: float, limit: float) -> bool:
    """`total <= limit`, allowing for float rounding in the sum."""
    return total <= _allowance(limit)


def _allowance(limit: float) -> float:
    return limit + REL_TOL * max(1.0, abs(limit))


def solve_budget(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float]],
                 limit: float) -> list[int]:
    """Pick option `j_i` for each item i, minimizing Σ costs[i][j_i] subject to Σ sizes[i][j_i] <= limit.

    >>> solve_budget([[0, 1], [0, 5]], [[8, 4], [8, 4]], 12)  # shrink the cheaper item
    [1, 0]

    Exact: a binary MILP (one-hot per item) solved by HiGHS with relative gap 0, over the options a
    greedy feasible assignment leaves in reach, costs scaled so the largest is 1e6 (HiGHS's
    absolute gap is 1e-6 of that scale); "fits" is `fits(total, limit)`, which
    allows 1e-9 relative for float rounding, and every answer is checked against it. Ties are
    settled before solving: an option is dropped when another is no worse in cost and size (of two
    equal options the lower index stays), so an item never pays bytes for nothing; ties across
    items are HiGHS's choice, the same on every run. Raises `BudgetInfeasible` when nothing fits.
    """
    costs, sizes = _validate(costs, sizes, limit)
    smallest = math.fsum(min(s) for s in sizes)
    if not fits(smallest, limit):
        raise BudgetInfeasible(smallest, limit)
    # What the items may spend above their smallest options. Options that alone overspend it are
    # dropped; borderline ones stay for the MILP and the exact check after it to decide.
    room = _allowance(limit) - smallest
    options = [[j for j in _undominated(c, s) if s[j] - min(s) <= room * (1 + 1e-5)]
               for c, s in zip(costs, sizes)]
    cheapest = [min(opts, key=lambda j, c=c: c[j]) for opts, c in zip(options, costs)]
    if fits(_total(sizes, cheapest), limit) or all(len(opts) == 1 for opts in options):
        return cheapest  # the budget does not bind, or leaves no choice
    options = _within_reach(costs, options, _greedy(costs, sizes, options, limit))
    # The room left above the smallest remaining options: pruning may leave an item only its large
    # ones, and sizes scaled by the room before it let HiGHS's 1e-6 feasibility slack pass
    # assignments over the limit until the cuts ran out.
    room = _allowance(limit) - math.fsum(min(s[j] for j in opts) for s, opts in zip(sizes, options))
    if room <= 0 or all(len(opts) == 1 for opts in options):
        return [min(opts, key=lambda j, s=s: s[j]) for s, opts in zip(sizes, options)]
    cuts: list[list[int]] = []
    for _ in range(_MAX_CUTS):
        choice = _solve_milp(costs, sizes, options, room, cuts)
        if fits(_total(sizes, choice), limit):
            return choice
        # HiGHS accepts rows violated by up to 1e-6 (of the room), so an assignment just over the
        # limit can come back; exclude exactly that one and solve again.
        cuts.append(choice)
    raise RuntimeError(f"the budget solver kept returning assignments over the limit {limit:g}; "
                       "please report this instance")


def solve_avg_bits(costs: Sequence[Sequence[float]], counts: Sequence[int],
                   bits: Sequence[float] | Sequence[Sequence[float]], avg_bits: float) -> list[int]:
    """`budget avg_bits<=avg_bits`: option j of target i stores counts[i] weights at bits[j] (or
    bits[i][j] when the all-in bits differ per target, e.g. ragged groups) bits each.

    >>> solve_avg_bits([[0, 3], [0, 1]], [100, 300], [8.0, 4.25], 6.0)
    [0, 1]
    """
    per_item = [list(bits)] * len(counts) if bits and not isinstance(bits[0], Sequence) else bits
    if len(per_item) != len(counts):
        raise ValueError(f"bits has {len(per_item)} rows but there are {len(counts)} targets")
    if any(n < 0 for n in counts) or sum(counts) == 0:
        raise ValueError("weight counts must be non-negative with a positive total")
    total = sum(counts)
    sizes = [[b * n for b in row] for row, n in zip(per_item, counts)]
    try:
        return solve_budget(costs, sizes, avg_bits * total)
    except BudgetInfeasible as e:
        raise BudgetInfeasible(e.smallest_achievable / total, avg_bits, " bits/weight") from None


# ---- helpers ---------------------------------------------------------------------------------

def _validate(costs, sizes, limit) -> tuple[list[list[float]], list[list[float]]]:
    if len(costs) != len(sizes):
        raise ValueError(f"costs has {len(costs)} items but sizes has {len(sizes)}; give one row per target")
    if not len(costs):
        raise ValueError("no items to assign; pass at least one target")
    rows_c, rows_s = [], []
    for i, (c, s) in enumerate(zip(costs, sizes)):
        if len(c) != len(s) or not len(c):
            raise ValueError(f"item {i}: {len(c)} costs and {len(s)} sizes; each item needs the same "
                             "positive number of both, one per option")
        rows_c.append([float(v) for v in c])
        rows_s.append([float(v) for v in s])
    if not all(math.isfinite(v) for row in rows_c + rows_s for v in row) or not math.isfinite(limit):
        raise ValueError("costs, sizes and the limit must be finite numbers (no NaN or inf)")
    return rows_c, rows_s


def _undominated(c: list[float], s: list[float]) -> list[int]:
    """Options no other option beats: dropping the rest shrinks the problem and settles exact ties
    (an option equal to an earlier one in both cost and size is dropped)."""
    def beats(k, j):
        return c[k] <= c[j] and s[k] <= s[j] and (c[k] < c[j] or s[k] < s[j] or k < j)
    return [j for j in range(len(c)) if not any(beats(k, j) for k in range(len(c)) if k != j)]


def _greedy(costs, sizes, options, limit) -> list[int]:
    """A feasible assignment, good enough to bound the optimum: every item at its smallest option,
    then upgrades along each item's lower convex hull of (size, cost), the most cost saved per
    byte first, each taken while it fits (the multiple-choice knapsack's LP greedy: O(n·k²), where
    rescanning every option per upgrade took 12 s on 2,000 targets)."""
    choice = [min(opts, key=lambda j, s=s, c=c: (s[j], c[j])) for opts, s, c in zip(options, sizes, costs)]
    steps = []  # (cost saved per byte, item, from, to), along each item's hull
    for i, (opts, s, c) in enumerate(zip(options, sizes, costs)):
        at = choice[i]
        while True:
            better = [j for j in opts if s[j] > s[at] and c[j] < c[at]]
            if not better:
                break
            nxt = max(better, key=lambda j: ((c[at] - c[j]) / (s[j] - s[at]), -s[j]))
            steps.append(((c[at] - c[nxt]) / (s[nxt] - s[at]), i, at, nxt))
            at = nxt
    spent = _total(sizes, choice)
    for _, i, frm, to in sorted(steps, key=lambda t: -t[0]):
        more = sizes[i][to] - sizes[i][frm]
        if choice[i] == frm and fits(spent + more, limit):
            choice[i], spent = to, spent + more
    return choice


def _within_reach(costs, options, feasible: list[int]) -> list[list[int]]:
    """Options that an optimal assignment may hold: costs are ≥ 0 above each item's least, so an
    option costing more above its item's least than the feasible assignment's whole excess can
    never be in one. Dropping them keeps a huge cost (a layer whose outputs explode at int2) from
    setting the MILP's scale: costs scaled by the largest, HiGHS's absolute gap of 1e-6 hid
    every difference under 1e-6 of it, and the solver returned 12× the optimal cost."""
    least = [min(c[j] for j in opts) for c, opts in zip(costs, options)]
    excess = math.fsum(c[j] - m for c, j, m in zip(costs, feasible, least))
    bound = excess * (1 + 1e-9) + 1e-300
    return [[j for j in opts if c[j] - m <= bound or j == f]
            for c, opts, m, f in zip(costs, options, least, feasible)]


def _total(rows: list[list[float]], choice: list[int]) -> float:
    return math.fsum(row[j] for row, j in zip(rows, choice))


def _solve_milp(costs, sizes, options, room, cuts) -> list[int]:
    """One binary MILP over the remaining options, minus the assignments in `cuts`. Costs and sizes
    are shifted by each item's minimum and scaled (costs to _COST_SCALE, sizes by the room above
    the smallest total), so HiGHS's absolute tolerances mean the same whatever the caller's units."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # scipy stays out of module import

    flat = [(i, j) for i, opts in enumerate(options) for j in opts]
    column = {ij: k for k, ij in enumerate(flat)}
    least_c = [min(costs[i][k] for k in opts) for i, opts in enumerate(options)]
    least_s = [min(sizes[i][k] for k in opts) for i, opts in enumerate(options)]
    c = np.array([costs[i][j] - least_c[i] for i, j in flat])
    s = np.array([sizes[i][j] - least_s[i] for i, j in flat]) / room
    one_hot = np.zeros((len(options), len(flat)))
    one_hot[[i for i, _ in flat], np.arange(len(flat))] = 1
    constraints = [LinearConstraint(one_hot, 1, 1), LinearConstraint(s[None], -np.inf, 1)]
    for cut in cuts:  # "not all of these again": at most n - 1 of the cut's choices
        row = np.zeros(len(flat))
        row[[column[i, j] for i, j in enumerate(cut)]] = 1
        constraints.append(LinearConstraint(row[None], -np.inf, len(options) - 1))
    with native_stdout_silenced():
        res = milp(c * (_COST_SCALE / max(c.max(), 1e-300)), integrality=np.ones(len(flat)),
                   bounds=Bounds(0, 1), constraints=constraints, options={"mip_rel_gap": 0})
    if not res.success:
        raise RuntimeError(f"the budget solver failed: {res.message}")
    chosen = [flat[k] for k in np.flatnonzero(np.round(res.x) == 1)]
    return [j for _, j in sorted(chosen)]


@contextlib.contextmanager
def native_stdout_silenced():
    """File descriptor 1 points at /dev/null inside. HiGHS (C++) writes debugging lines such as
    "HighsMipSolverData::transformNewIntegerFeasibleSolution …" straight to it on large budgets,
    whatever `disp` says, into the middle of compile's progress bars and the user's own output."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (a detached process): nothing to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
