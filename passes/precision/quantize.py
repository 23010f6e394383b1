"""`quantize <selector> int4 group=64 method=gptq`: every target in the rule's one format.

    quantize blocks.*.** : Linear int4 group=64 method=gptq

RTN needs nothing but the weight; GPTQ needs H = E[x xᵀ] of each target's input, from calibration,
and so does `clip=output` (each group's range searched with inputs weighted by E[x_j²]). GPTQ runs
block by block on the outputs of the blocks before it as compressed (passes/precision/
sequential.py) unless `sequential=false` (every Hessian from one run of the uncompressed graph);
followed by `adapt … init=error`, that sweep fits the adapters too (compensate.py).
"""
from __future__ import annotations

from ...dsl import ast as A
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from ..threads import one_thread
from .compensate import error_corrections, few_rows_note, sweep_details
from .encode import Candidate
from .sequential import sequential_encode
from .targets import DeadInputs, apply, encode_item, few_tokens_note, hessians_of, items_of, require_calib

__all__ = ["run"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    """Encode every target (RTN, or GPTQ on calibration Hessians) and swap its linear."""
    rule: A.Quantize = bound.rule
    cand = Candidate.of(rule)
    items = items_of(graph, bound)
    method = rule.get("method") if cand.is_packed else "rtn"
    clip = rule.get("clip") if cand.is_packed else "none"
    sequential = method == "gptq" and rule.get("sequential")
    refit = method == "gptq" and rule.get("refit")

    dead = DeadInputs()

    def encode_one(it, H):
        return encode_item(bound, ctx, dead, it, cand, H, method=method, clip=clip, refit=refit)

    details = {"format": str(cand), "method": method, **({"clip": clip} if clip != "none" else {}),
               **({"refit": True} if refit else {})}
    if sequential:
        require_calib(ctx, bound, "GPTQ")
        corrections = error_corrections(bound, ctx, items)
        with one_thread(), ctx.progress.task(f"GPTQ {cand}, block by block (line {bound.line})",
                                             total=len(items)) as step:
            encoded, rows, peak = sequential_encode(graph, items, ctx.calib, encode_one, step,
                                                    by_layer=rule.get("true_sequential"), compensate=corrections)
        details.update(sweep_details(rule.get("true_sequential"), corrections), calib_tokens=rows,
                       peak_calib_bytes=peak)
        return apply(graph, bound, items, {p: (cand, e) for p, e in encoded.items()}, details, ctx,
                     few_rows_note(corrections, rows) + few_tokens_note("GPTQ", rows, items) + dead.notes())
    needs_h = method == "gptq" or clip == "output"
    hessians = hessians_of(graph, items, ctx, bound, "GPTQ" if method == "gptq" else "clip=output",
                           diagonal=method != "gptq") if needs_h else {}
    chosen = {}
    with one_thread(), ctx.progress.task(f"{method.upper()} {cand} (line {bound.line})", total=len(items)) as step:
        for it in items:
            step(0, note=it.path)
            chosen[it.path] = (cand, encode_one(it, hessians[it.path].H if it.path in hessians else None))
            step()
    few = ()
    if hessians:
        details["calib_tokens"] = max(h.count for h in hessians.values())
        fewest = min(h.count for h in hessians.values())  # a target read on fewer rows than the rest
        few = few_tokens_note("GPTQ" if method == "gptq" else "clip=output", fewest, items)
    return apply(graph, bound, items, chosen, details, ctx, few + dead.notes())
