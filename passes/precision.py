"""The precision pass: `quantize` (one format for every target) and `precision … choose … budget`
(a format per target from measured sensitivity), both weight-only.

    quantize  blocks.*.** : Linear int4 group=64 method=gptq
    precision blocks.*.** : Linear choose {int8, int4 group=32} budget avg_bits<=6 by output_mse

Each target is encoded (RTN or GPTQ into packed codes, a half-precision copy, or left as is), then
quant_rewrite.py swaps its linear for `slimfx::quant_linear` (or a cast). Calibration
(calibrate.py) supplies H = E[x xᵀ] per target, for GPTQ and for the sensitivity
tr(ΔW H ΔWᵀ) = E‖ΔW x‖² that the budget solver (budget.py) minimizes.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch

from ..dsl import ast as A
from ..dsl.errors import Diagnostic, SpecError
from ..runtime.formats import QuantizedWeight, dequantize, from_rule, quantize_rtn
from ..runtime.report import RuleReport, format_bytes
from .bind import BoundRule
from .budget import BudgetInfeasible, solve_avg_bits, solve_budget
from .calibrate import collect_hessians
from .gptq import HessianAccumulator, gptq
from .graph import ModelGraph, Target
from .pipeline import Context, register
from .quant_rewrite import LinearSite, find_sites, to_half, to_quant_linear, weight_name, weight_still_held

__all__ = ["run_quantize", "run_precision", "Candidate", "encode", "decode"]

_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# An encoded weight: packed codes, a half-precision copy, or None for "left as it is".
Encoded = Union[QuantizedWeight, torch.Tensor, None]


@dataclass(frozen=True)
class Candidate:
    """One format a target may get: `Candidate("int4", 64, True)`; group/sym only for ints."""

    format: str
    group: int | None = None
    sym: bool = True

    @classmethod
    def of(cls, node: A.Quantize | A.FormatChoice) -> "Candidate":
        if node.format in _HALF or node.format == "keep":
            return cls(node.format)
        return cls(node.format, from_rule(node.format, node.get("group"), node.get("sym")).group, node.get("sym"))

    def __str__(self) -> str:
        if self.format in _HALF or self.format == "keep":
            return self.format
        group = "per-channel" if self.group is None else f"group={self.group}"
        return f"{self.format} {group}" + ("" if self.sym else " sym=false")


@dataclass
class _Item:
    """A target being rewritten: its fresh index entry, linear sites and fp32 [out, in] weight."""

    target: Target
    sites: list[LinearSite]
    w: torch.Tensor
    bias_numel: int
    bias_bytes: int


# ---- the passes --------------------------------------------------------------------------------


@register(A.Quantize)
def run_quantize(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    """Every target in the rule's one format (RTN, or GPTQ on calibration Hessians)."""
    rule: A.Quantize = bound.rule
    cand = Candidate.of(rule)
    items = _items(graph, bound)
    method = rule.get("method") if cand.format in ("int8", "int4", "int2") else "rtn"
    hessians = _hessians(graph, items, ctx, bound, "GPTQ") if method == "gptq" else {}
    with _one_thread():
        chosen = {it.target.path: encode(it.w, cand, method, _H(hessians, it), rule.get("damp"),
                                         rule.get("act_order")) for it in items}
    details = {"format": str(cand), "method": method}
    if hessians:
        details["calib_rows"] = max(h.count for h in hessians.values())
    return _apply(graph, bound, items, {p: (cand, e) for p, e in chosen.items()}, details)


@register(A.Precision)
def run_precision(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    """A format per target: least Σ tr(ΔW H ΔWᵀ) under the budget (exact knapsack).

    Every candidate is scored with RTN (its ŵ is cheap, and the ranking of formats is what the
    solver needs); only the chosen format is then encoded with the rule's method (GPTQ costs a
    pass over the columns, so scoring every candidate with it would multiply the compile time).
    Packed sizes do not depend on the method, so the budget holds either way.
    """
    rule: A.Precision = bound.rule
    cands = [Candidate.of(c) for c in rule.choices]
    items = _items(graph, bound)
    hessians = _hessians(graph, items, ctx, bound, "the budget solver (by output_mse)")
    options, costs, sizes = _score(items, cands, hessians)
    pick = _solve(rule, items, costs, sizes, ctx)
    method = rule.get("method")
    chosen = {}
    with _one_thread():
        for i, (it, j) in enumerate(zip(items, pick)):
            enc = options[i][j]
            if method == "gptq" and isinstance(enc, QuantizedWeight):
                enc = encode(it.w, cands[j], "gptq", hessians[it.target.path].H, rule.get("damp"),
                             _optional(rule, "act_order", False))
            chosen[it.target.path] = (cands[j], enc)
    weights = sum(it.w.numel() for it in items)
    details = {"method": method, "scored_with": "rtn", "metric": rule.metric,
               "budget": f"{rule.budget.metric}<={rule.budget.limit}{rule.budget.unit or ''}",
               "choices": {p: str(c) for p, (c, _) in chosen.items()},
               "sensitivity": sum(costs[i][j] for i, j in enumerate(pick)),
               "calib_rows": max(h.count for h in hessians.values()),
               "weight_bytes": sum(sizes[i][j] for i, j in enumerate(pick))}
    details["achieved_avg_bits"] = 8 * details["weight_bytes"] / weights
    return _apply(graph, bound, items, chosen, details)


# ---- encoding one weight -----------------------------------------------------------------------


def encode(w: torch.Tensor, cand: Candidate, method: str = "rtn", H: torch.Tensor | None = None,
           damp: float = 0.01, act_order: bool = False) -> Encoded:
    """w [out, in] in `cand`'s format. GPTQ needs H [in, in]."""
    if cand.format == "keep":
        return None
    if cand.format in _HALF:
        return w.to(_HALF[cand.format])
    fmt = from_rule(cand.format, cand.group, cand.sym)
    if method == "gptq":
        return gptq(w, H, fmt, damp=damp, act_order=act_order)
    return quantize_rtn(w, fmt)


def decode(enc: Encoded, w: torch.Tensor) -> torch.Tensor:
    """The float32 weight the rewritten graph computes with (`w` itself for keep)."""
    if enc is None:
        return w.float()
    if isinstance(enc, QuantizedWeight):
        return dequantize(enc)
    return enc.float()


def encoded_bytes(enc: Encoded, w: torch.Tensor) -> int:
    """Stored bytes of the weight alone (packed codes + scales + zeros, or the tensor)."""
    if isinstance(enc, QuantizedWeight):
        return sum(t.numel() * t.element_size() for t in (enc.qweight, enc.scales, enc.zeros) if t is not None)
    t = w if enc is None else enc
    return t.numel() * t.element_size()


# ---- helpers -----------------------------------------------------------------------------------


def _items(graph: ModelGraph, bound: BoundRule) -> list[_Item]:
    """The rule's targets as the graph is now (an earlier pass may have rewritten it)."""
    items = []
    for t in bound.targets:
        target = graph.targets.get(t.path)
        if target is None:
            raise SpecError.at("unsupported", f"{t.path} is no longer in the graph (an earlier rule removed it), "
                               f"so `{bound.text}` cannot quantize it", line=bound.line,
                               column=bound.rule.span.column, hint="narrow the selector")
        w = graph.param(weight_name(target)).detach()
        w = (w.T if target.transposed else w).float()
        bias = [graph.param(p) for p in target.params if p != weight_name(target)]
        items.append(_Item(target, find_sites(graph, target), w, sum(b.numel() for b in bias),
                           sum(b.numel() * b.element_size() for b in bias)))
    return items


def _hessians(graph: ModelGraph, items: list[_Item], ctx: Context, bound: BoundRule,
              who: str) -> dict[str, HessianAccumulator]:
    if not ctx.calib:
        raise SpecError(Diagnostic("missing-value", f"{who} needs calibration inputs, and none were given",
                                   bound.line, bound.rule.span.column, len(bound.rule.kind),
                                   "pass compile(..., calib=[batch, ...]) or calib=[text, ...] (with a "
                                   "model from slimfx.models.load), or use method=rtn"), ctx.source, ctx.filename)
    return collect_hessians(graph, {it.target.path: it.sites for it in items}, ctx.calib)


def _score(items: list[_Item], cands: list[Candidate], hessians: dict[str, HessianAccumulator]):
    """Per target and candidate: the RTN encoding, its output error tr(ΔW H ΔWᵀ), its bytes."""
    options, costs, sizes = [], [], []
    for it in items:
        H = hessians[it.target.path].H.float()  # float32: ranking formats needs no float64
        encs = [encode(it.w, c) for c in cands]
        options.append(encs)
        costs.append([_sensitivity(it.w, decode(e, it.w), H) for e in encs])
        sizes.append([encoded_bytes(e, it.w) for e in encs])
    return options, costs, sizes


def _sensitivity(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) as gptq.output_error, in float32 (summed in float64): 3-4x faster on the
    1536-wide layers of a 135M model, and ranking formats needs no more precision."""
    d = w.float() - w_hat
    return float(((d @ H) * d).sum(dtype=torch.float64))


def _solve(rule: A.Precision, items: list[_Item], costs, sizes, ctx: Context) -> list[int]:
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


def _apply(graph: ModelGraph, bound: BoundRule, items: list[_Item], chosen: dict, details: dict) -> RuleReport:
    """Rewrite every target; report bytes measured on the stored tensors."""
    before = sum(it.target.nbytes for it in items)
    after, weights, packed = 0, 0, 0
    kept, tied = [], []
    for it in items:
        cand, enc = chosen[it.target.path]
        if enc is None:
            kept.append(it.target.path)
        elif isinstance(enc, QuantizedWeight):
            to_quant_linear(graph, it.target, it.sites, enc)
        else:
            to_half(graph, it.target, it.sites, enc.dtype)
        held = enc is not None and weight_still_held(graph, it.target)
        tied += [it.target.path] if held else []
        after += encoded_bytes(enc, it.w) + it.bias_bytes + (it.target.nbytes - it.bias_bytes if held else 0)
        weights += it.w.numel()
        packed += encoded_bytes(enc, it.w)
    graph.module.recompile()  # the module's generated forward still reads the old weights
    details = {**details, "bits_per_weight": 8 * packed / weights, "weights": weights}
    return RuleReport(bound.line, bound.text, bound.rule.kind, tuple(it.target.path for it in items),
                      _params(items), _params(items), before, after, details, _notes(bound, kept, tied))


def _params(items: list[_Item]) -> int:
    return sum(it.w.numel() + it.bias_numel for it in items)


def _notes(bound: BoundRule, kept: list[str], tied: list[str]) -> tuple[str, ...]:
    notes = list(bound.warnings)
    if kept:
        notes.append(f"{len(kept)} target{'s' if len(kept) != 1 else ''} kept in full precision (`keep`)")
    if tied:
        notes.append(f"{', '.join(tied)}: weight tied to another module, which keeps the original (not freed)")
    return tuple(notes)


def _optional(rule: A.Rule, name: str, default):
    """A parameter the rule's schema may not list yet (`precision … act_order=` is not in
    dsl/schema.py): its value, or `default`."""
    try:
        return rule.get(name)
    except KeyError:
        return default


@contextmanager
def _one_thread():
    """GPTQ's column loop is thousands of tiny ops: intra-op threads only add synchronisation
    (measured 2.3x slower with 2 threads than with 1 on a 576x576 layer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _H(hessians: dict[str, HessianAccumulator], it: _Item) -> torch.Tensor | None:
    acc = hessians.get(it.target.path)
    return None if acc is None else acc.H
