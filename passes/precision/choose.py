"""`precision <selector> choose {…} budget … by output_mse`: a format per target from measured
sensitivity, under an average-bits or bytes budget.

    precision blocks.*.** : Linear choose {int8, int4 group=32} budget avg_bits<=6 by output_mse

Each candidate is scored by the output error it causes, tr(ΔW H ΔWᵀ) = E‖ΔW x‖², and the budget
solver (budget.py, an exact multiple-choice knapsack) picks the least total error that fits.
"""
from __future__ import annotations

import math

import torch

from ...dsl import ast as A
from ...dsl.errors import Diagnostic, SpecError
from ...runtime.formats import QuantizedWeight
from ...runtime.progress import Progress
from ...runtime.report import RuleReport, format_bytes
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from .budget import BudgetInfeasible, solve_avg_bits, solve_budget
from .encode import Candidate, decode, encode, encoded_bytes
from .gptq import HessianAccumulator
from .targets import Item, apply, hessians_of, items_of, one_thread

__all__ = ["run"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    """Least Σ tr(ΔW H ΔWᵀ) under the budget.

    Every candidate is scored with RTN (its ŵ is cheap, and the ranking of formats is what the
    solver needs); only the chosen format is then encoded with the rule's method (GPTQ costs a
    pass over the columns, so scoring every candidate with it would multiply the compile time).
    Packed sizes do not depend on the method, so the budget holds either way.
    """
    rule: A.Precision = bound.rule
    cands = [Candidate.of(c) for c in rule.choices]
    items = items_of(graph, bound)
    hessians = hessians_of(graph, items, ctx, bound, "the budget solver (by output_mse)")
    options, costs, sizes = _score(items, cands, hessians, ctx, bound)
    with ctx.progress.task(f"solving the budget (line {bound.line})", total=None):
        pick = _solve(rule, items, costs, sizes, ctx)
    chosen = _encode_chosen(rule, items, cands, options, pick, hessians, ctx, bound)
    weights = sum(it.w.numel() for it in items)
    clip = rule.get("clip")
    details = {"method": rule.get("method"), "scored_with": "rtn" if clip == "none" else f"rtn clip={clip}",
               "metric": rule.metric,
               "budget": f"{rule.budget.metric}<={rule.budget.limit}{rule.budget.unit or ''}",
               "choices": {p: str(c) for p, (c, _) in chosen.items()},
               "sensitivity": sum(costs[i][j] for i, j in enumerate(pick)),
               "calib_rows": max(h.count for h in hessians.values()),
               "weight_bytes": sum(sizes[i][j] for i, j in enumerate(pick))}
    details["achieved_avg_bits"] = 8 * details["weight_bytes"] / weights
    return apply(graph, bound, items, chosen, details, ctx)


def _score(items: list[Item], cands: list[Candidate], hessians: dict[str, HessianAccumulator], ctx: Context,
           bound: BoundRule):
    """Per target and candidate: the RTN encoding, its output error tr(ΔW H ΔWᵀ), its bytes."""
    options, costs, sizes = [], [], []
    with ctx.progress.task(f"scoring {len(cands)} formats (line {bound.line})", total=len(items)) as step:
        for it in items:
            step(0, note=it.path)
            H = hessians[it.path].H.float()  # float32: ranking formats needs no float64
            encs = [encode(it.w, c, "rtn", H, clip=bound.rule.get("clip")) for c in cands]
            options.append(encs)
            costs.append([_sensitivity(it.w, decode(e, it.w), H) for e in encs])
            sizes.append([encoded_bytes(e, it.w) for e in encs])
            step()
    return options, costs, sizes


def _sensitivity(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) as gptq.output_error, in float32 (summed in float64): 3-4x faster on the
    1536-wide layers of a 135M model, and ranking formats needs no more precision."""
    d = w.float() - w_hat
    return float(((d @ H) * d).sum(dtype=torch.float64))


def _encode_chosen(rule: A.Precision, items, cands, options, pick, hessians, ctx: Context, bound: BoundRule):
    """The chosen format per target, re-encoded with GPTQ when the rule asks for it."""
    method, chosen = rule.get("method"), {}
    bars = ctx.progress if method == "gptq" else Progress()  # RTN encodings are already made: no bar
    with one_thread(), bars.task(f"GPTQ chosen formats (line {bound.line})", total=len(items)) as step:
        for i, (it, j) in enumerate(zip(items, pick)):
            step(0, note=it.path)
            enc = options[i][j]
            if method == "gptq" and isinstance(enc, QuantizedWeight):
                enc = encode(it.w, cands[j], "gptq", hessians[it.path].H, rule.get("damp"),
                             _optional(rule, "act_order", False), rule.get("clip"))
            chosen[it.path] = (cands[j], enc)
            step()
    return chosen


def _solve(rule: A.Precision, items: list[Item], costs, sizes, ctx: Context) -> list[int]:
    """Option index per target; an infeasible budget is the user's error at the budget."""
    try:
        if rule.budget.metric == "avg_bits":
            bits = [[8 * s / it.w.numel() for s in row] for it, row in zip(items, sizes)]
            return solve_avg_bits(costs, [it.w.numel() for it in items], bits, rule.budget.limit_value)
        bias = [it.bias_bytes for it in items]
        return solve_budget(costs, [[s + b for s in row] for row, b in zip(sizes, bias)], rule.budget.limit_value)
    except BudgetInfeasible as e:
        span = rule.budget.span
        if rule.budget.metric == "avg_bits":
            figure = f"{e.smallest_achievable:.4g} bits/weight"
        else:
            figure = f"{math.ceil(e.smallest_achievable):,} bytes ({format_bytes(e.smallest_achievable)}, weights + biases)"
        raise SpecError(Diagnostic(
            "out-of-range", f"the budget {rule.budget.metric}<={rule.budget.limit}{rule.budget.unit or ''} cannot "
            f"be met: the smallest achievable is {figure} (every target at its "
            "smallest candidate)", span.line, span.column, max(1, span.end_column - span.column),
            "raise the limit, or offer a smaller format in `choose {…}`"), ctx.source, ctx.filename) from None


def _optional(rule: A.Rule, name: str, default):
    """A parameter the rule's schema may not list yet (`precision … act_order=` is not in
    dsl/schema.py): its value, or `default`."""
    try:
        return rule.get(name)
    except KeyError:
        return default
