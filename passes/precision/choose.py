"""`precision <selector> choose {…} budget … by output_mse|fisher`: a format per target from
measured sensitivity, under an average-bits or bytes budget.

    precision blocks.*.** : Linear choose {int8, int4 group=32} budget avg_bits<=6 by output_mse

Each candidate is scored by the output error it causes, tr(ΔW H ΔWᵀ) = E‖ΔW x‖² (`output_mse`),
or that error per output weighted by the loss's sensitivity to it (`fisher`, fisher.py), and the
budget solver (budget.py, an exact multiple-choice knapsack) picks the least total that fits.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from ...dsl import ast as A
from ...dsl.errors import Diagnostic, SpecError
from ...runtime.report import RuleReport, format_bytes
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from ..threads import one_thread
from .budget import BudgetInfeasible, solve_avg_bits, solve_budget
from .encode import Candidate, OutOfRange, decode, encoded_bytes
from .fisher import FisherUnavailable, NoFisherTokens, output_fisher, weighted_error
from .compensate import error_corrections, few_rows_note, sweep_details
from .sequential import sequential_encode, sequential_scores
from .targets import (DeadInputs, Item, apply, encode_item, few_tokens_note, formats_by_reason, hessians_of, items_of,
                      none_holds, require_calib)

__all__ = ["run"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    """Least Σ tr(ΔW H ΔWᵀ) (or its Fisher-weighted form) under the budget.

    Every candidate is scored with the method that will encode it: with `method=gptq`, each target
    is GPTQ-encoded in every candidate format and scored by that encoding's output error (RTN's
    error ranks formats differently from GPTQ's: GPTQ gains more on some layers than others).
    GPTQ runs block by block (`sequential=true`, the default): one scoring sweep over the blocks
    on the uncompressed model's activations, the solver once, then the chosen formats encoded
    sequentially as `quantize` does; `sequential=false` takes every Hessian from one run.
    Packed sizes do not depend on the method, so the budget holds either way.
    """
    rule: A.Precision = bound.rule
    items = items_of(graph, bound)
    method, clip = rule.get("method"), rule.get("clip")
    scorer = _Scorer(bound, ctx, [Candidate.of(c) for c in rule.choices],
                     _fisher(graph, items, ctx, bound) if rule.metric == "fisher" else {})
    details = {"method": method, "scored_with": method + (f" clip={clip}" if clip != "none" else "")
               + (" refit" if rule.get("refit") else ""),
               "metric": rule.metric, "budget": f"{rule.budget.metric}<={rule.budget.limit}{rule.budget.unit or ''}"}
    run_as = _by_blocks if method == "gptq" and rule.get("sequential") else _in_one_run
    notes: list[str] = []
    chosen, costs, sizes, pick = run_as(graph, bound, ctx, items, scorer, details, notes)
    weights = sum(it.w.numel() for it in items)
    details.update(choices={p: str(c) for p, (c, _) in chosen.items()},
                   sensitivity=sum(costs[i][j] for i, j in enumerate(pick)),
                   weight_bytes=sum(sizes[i][j] for i, j in enumerate(pick)))
    details["achieved_avg_bits"] = 8 * details["weight_bytes"] / weights
    notes.insert(0, choice_note(details["choices"], details["achieved_avg_bits"], rule))
    notes.extend(scorer.unheld_notes())
    return apply(graph, bound, items, chosen, details, ctx, tuple(notes) + scorer.dead.notes())


def choice_note(choices: dict[str, str], bits: float, rule: A.Precision) -> str:
    """What the solver chose, for the report's notes (it was only in meta.json): "chose int4
    group=64 for 198 linears, int8 for 12; 4.96 bits/weight (budget avg_bits<=5)"."""
    ranked = sorted(Counter(choices.values()).items(), key=lambda kv: (-kv[1], kv[0]))
    parts = [f"{fmt} for {n} linear{'s' if n != 1 else ''}" if i == 0 else f"{fmt} for {n}"
             for i, (fmt, n) in enumerate(ranked)]
    return (f"chose {', '.join(parts)}; {bits:.2f} bits/weight "
            f"(budget {rule.budget.metric}<={rule.budget.limit}{rule.budget.unit or ''})")


class _Scorer:
    """Encodes a target in a candidate format with the rule's method, and scores encodings."""

    def __init__(self, bound: BoundRule, ctx: Context, cands: list[Candidate], fisher: dict[str, torch.Tensor]):
        self.bound, self.ctx, self.rule, self.cands, self.fisher = bound, ctx, bound.rule, cands, fisher
        self.dead = DeadInputs()
        self.unheld: dict[str, list[tuple[Candidate, OutOfRange]]] = {}  # path -> the formats that cannot hold it

    def encode(self, it: Item, cand: Candidate, H: torch.Tensor | None, refuse_unheld: bool = True):
        # a weight the format cannot hold is refused here: the solver said "costs … must be finite"
        r = self.rule
        return encode_item(self.bound, self.ctx, self.dead, it, cand, H, method=r.get("method"), clip=r.get("clip"),
                           refit=r.get("refit"), refuse_unheld=refuse_unheld)

    def __call__(self, it: Item, H: torch.Tensor) -> tuple[list[float | None], list[int | None], list]:
        """(cost, bytes, encoding) of every candidate; cost and bytes None for a format that cannot
        hold the weight (an int4 group past fp16 scales): the solver picks among the others, and
        the report says so. Refused where no offered format holds it."""
        costs, sizes, encs = [], [], []
        for cand in self.cands:
            try:
                e = self.encode(it, cand, H, refuse_unheld=False)
            except OutOfRange as err:
                self.unheld.setdefault(it.path, []).append((cand, err))
                costs.append(None)
                sizes.append(None)
                encs.append(None)
                continue
            w_hat = decode(e, it.w)
            costs.append(weighted_error(it.w.double() - w_hat.double(), H.double(), self.fisher[it.path])
                         if self.fisher else _sensitivity(it.w, w_hat, H.float()))
            sizes.append(encoded_bytes(e, it))
            encs.append(e)
        if all(c is None for c in costs):
            raise none_holds(self.bound, self.ctx, it, self.unheld[it.path])
        return costs, sizes, encs

    def unheld_notes(self) -> list[str]:
        """One report line per target some offered format could not hold (it was chosen among the rest)."""
        return [f"{path}: " + "; ".join(f"{', '.join(cands)} cannot hold its weights ({why})"
                                        for why, cands in formats_by_reason(unheld).items())
                + "; chosen among the other formats" for path, unheld in self.unheld.items()]


def _by_blocks(graph: ModelGraph, bound: BoundRule, ctx: Context, items: list[Item], scorer: _Scorer,
               details: dict, notes: list[str]):
    """GPTQ block by block: a scoring sweep, the solver, then the chosen formats encoded."""
    rule = bound.rule
    require_calib(ctx, bound, "GPTQ")
    with one_thread(), ctx.progress.task(f"scoring {len(scorer.cands)} formats with GPTQ, block by block "
                                         f"(line {bound.line})", total=len(items)) as step:
        # The encodings are dropped: the chosen ones are made again on the compressed stream.
        scored, rows, peak = sequential_scores(graph, items, ctx.calib, lambda it, H: scorer(it, H)[:2], step)
    costs, sizes = [scored[it.path][0] for it in items], [scored[it.path][1] for it in items]
    pick = _solve(rule, items, costs, sizes, ctx)
    cand = {it.path: scorer.cands[j] for it, j in zip(items, pick)}
    corrections = error_corrections(bound, ctx, items)
    with one_thread(), ctx.progress.task(f"GPTQ chosen formats, block by block (line {bound.line})",
                                         total=len(items)) as step:
        encoded, rows2, peak2 = sequential_encode(graph, items, ctx.calib,
                                                  lambda it, H: scorer.encode(it, cand[it.path], H), step,
                                                  by_layer=rule.get("true_sequential"), compensate=corrections)
    details.update(sweep_details(rule.get("true_sequential"), corrections),
                   calib_tokens=max(rows, rows2), peak_calib_bytes=max(peak, peak2))
    notes.extend(few_rows_note(corrections, rows2))
    notes.extend(few_tokens_note("the budget's scoring", min(rows, rows2), items))
    return {p: (cand[p], e) for p, e in encoded.items()}, costs, sizes, pick


def _in_one_run(graph: ModelGraph, bound: BoundRule, ctx: Context, items: list[Item], scorer: _Scorer,
                details: dict, notes: list[str]):
    """Every Hessian from one run of the graph as it is; the chosen encodings are the scored ones."""
    hessians = hessians_of(graph, items, ctx, bound, f"the budget solver (by {bound.rule.metric})")
    options, costs, sizes = [], [], []
    with one_thread(), ctx.progress.task(f"scoring {len(scorer.cands)} formats with "
                                         f"{bound.rule.get('method').upper()} (line {bound.line})",
                                         total=len(items)) as step:
        for it in items:
            step(0, note=it.path)
            cost, size, encs = scorer(it, hessians[it.path].H)
            costs.append(cost)
            sizes.append(size)
            options.append(encs)
            step()
    pick = _solve(bound.rule, items, costs, sizes, ctx)
    details["calib_tokens"] = max(h.count for h in hessians.values())
    # the fewest rows any target's statistics read (as quantize says it)
    notes.extend(few_tokens_note("the budget's scoring", min(h.count for h in hessians.values()), items))
    return ({it.path: (scorer.cands[j], options[i][j]) for i, (it, j) in enumerate(zip(items, pick))},
            costs, sizes, pick)


def _fisher(graph: ModelGraph, items: list[Item], ctx: Context, bound: BoundRule) -> dict[str, torch.Tensor]:
    """Per target, E[(∂L/∂y)²] of its outputs (fisher.py); refused at the rule where the graph
    cannot give loss gradients."""
    require_calib(ctx, bound, "`by fisher`")
    try:
        return output_fisher(graph, {it.path: [s.node for s in it.sites] for it in items}, ctx.calib, ctx.progress)
    except NoFisherTokens as e:
        raise SpecError(Diagnostic(
            "unsupported", f"`by fisher` weighs each output by the gradient of the next-token loss over the "
            f"calibration text: {e}", bound.line, bound.rule.span.column, len(bound.rule.kind),
            "calibrate on rows of two tokens or more, or use `by output_mse`"), ctx.source, ctx.filename) from None
    except (FisherUnavailable, RuntimeError) as e:
        raise SpecError(Diagnostic(
            "unsupported", f"`by fisher` weighs each output by the gradient of a causal LM's next-token loss, "
            f"and this model cannot give it: {e}", bound.line, bound.rule.span.column, len(bound.rule.kind),
            "use `by output_mse`"), ctx.source, ctx.filename) from None


def _sensitivity(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) as gptq.output_error, in float32 (summed in float64): 3-4x faster on the
    1536-wide layers of a 135M model, and ranking formats needs no more precision."""
    d = w.float() - w_hat
    return float(((d @ H) * d).sum(dtype=torch.float64))


def _solve(rule: A.Precision, items: list[Item], costs, sizes, ctx: Context) -> list[int]:
    """Option index per target; an infeasible budget is the user's error at the budget."""
    with ctx.progress.task(f"solving the budget (line {rule.span.line})", total=None):
        return _solve_now(rule, items, costs, sizes, ctx)


def _solve_now(rule: A.Precision, items: list[Item], costs, sizes, ctx: Context) -> list[int]:
    # only the formats that hold each target (a None cost: _Scorer), indices mapped back after
    held = [[j for j, c in enumerate(row) if c is not None] for row in costs]
    costs = [[row[j] for j in js] for row, js in zip(costs, held)]
    sizes = [[row[j] for j in js] for row, js in zip(sizes, held)]
    try:
        if rule.budget.metric == "avg_bits":
            bits = [[8 * s / it.w.numel() for s in row] for it, row in zip(items, sizes)]
            pick = solve_avg_bits(costs, [it.w.numel() for it in items], bits, rule.budget.limit_value)
        else:
            bias = [it.bias_bytes for it in items]
            pick = solve_budget(costs, [[s + b for s in row] for row, b in zip(sizes, bias)], rule.budget.limit_value)
        return [js[k] for js, k in zip(held, pick)]
    except BudgetInfeasible as e:
        span = rule.budget.span
        holds = " that holds it" if any(len(js) < len(rule.choices) for js in held) else ""
        if rule.budget.metric == "avg_bits":
            figure = f"{e.smallest_achievable:.4g} bits/weight"
        else:
            figure = f"{math.ceil(e.smallest_achievable):,} bytes ({format_bytes(e.smallest_achievable)}, weights + biases)"
        raise SpecError(Diagnostic(
            "out-of-range", f"the budget {rule.budget.metric}<={rule.budget.limit}{rule.budget.unit or ''} cannot "
            f"be met: the smallest achievable is {figure} (every target at its "
            f"smallest candidate{holds})", span.line, span.column, max(1, span.end_column - span.column),
            "raise the limit, or offer a smaller format in `choose {…}`"), ctx.source, ctx.filename) from None
