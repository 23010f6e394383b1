"""`adapt <linears> lora|dora rank= alpha= dropout= init= merge= from=`: trainable adapters.

    adapt blocks.*.attn.{q,v} lora rank=16 alpha=32
    adapt blocks.*.** : Linear dora rank=32 alpha=64 dropout=0.05
    adapt blocks.*.attn.{q,v} lora from="adapters/support-bot" merge=true

Each target's linear — nn.Linear, Conv1D, or one a `quantize` already packed (QLoRA) — gets the
adapter of passes/lora.py. A fresh adapter starts as PEFT's does (A: kaiming-uniform with
a=√5, or normal with std 1/r; B: zeros; DoRA's magnitude: the row norms of the base weight), so
the compiled model's outputs are bit-identical to the original's until it trains. `from=` reads
a PEFT adapter directory instead (passes/adapters/peft_in.py). `merge=true` folds the adapters
into the base weights right away (runtime/adapter_merge.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...dsl import ast as A
from ...dsl.errors import SpecError
from ...runtime.adapter_merge import MergeError, merge_adapters
from ...runtime.adapters import Adapter
from ...runtime.report import RuleReport
from ..bind import BoundRule, graph_params
from ..context import Context
from ..graph import ModelGraph, Target
from ..lora import BaseSite, base_sites, base_weight, insert_adapter, site_dims
from . import peft_in

__all__ = ["run", "fresh_tensors"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Adapt = bound.rule
    loaded = peft_in.read(rule.get("from"), bound, ctx) if rule.get("from") else None
    before_bytes = sum(graph.targets[t.path].nbytes for t in bound.targets if t.path in graph.targets)
    added, inserted = {}, []
    with ctx.progress.task(f"adding {rule.method} adapters (line {bound.line})", total=len(bound.targets)) as step:
        for t in bound.targets:
            target = _current(graph, t, bound, ctx)
            sites = base_sites(graph, target)
            if loaded is not None:
                adapter, tensors = loaded.adapter(target, sites[0])
            else:
                adapter = Adapter(target.path, rule.method, rule.get("rank"), rule.get("alpha"), rule.get("dropout"),
                                  sites[0].transposed)
                _check_rank(adapter, sites[0], bound, ctx)
                tensors = fresh_tensors(graph, sites[0], adapter, rule.get("init"))
            insert_adapter(graph, target, adapter, tensors)
            added[target.path] = sum(v.numel() for v in tensors.values())
            inserted.append(adapter)
            step(note=target.path)
    notes = list(bound.warnings)
    if rule.get("merge"):
        _merge(graph, [a.target for a in inserted], bound, ctx)
        if loaded is None:
            notes.append("fresh adapters are zero (B = 0): merging them left every weight as it was; use "
                         "merge=false to train them, or from=\"dir\" to merge a trained adapter")
    return _report(graph, bound, inserted, added, before_bytes, notes)


def _current(graph: ModelGraph, t: Target, bound: BoundRule, ctx: Context) -> Target:
    target = graph.targets.get(t.path)
    if target is None:
        raise SpecError.at("unsupported", f"{t.path} is no longer in the graph (an earlier rule removed it), "
                           f"so `{bound.text}` cannot adapt it", line=bound.line, column=bound.rule.span.column,
                           source=ctx.source, filename=ctx.filename, hint="narrow the selector")
    return target


def _check_rank(adapter: Adapter, site: BaseSite, bound: BoundRule, ctx: Context) -> None:
    out_features, in_features = site_dims(site)
    if adapter.rank > min(out_features, in_features):
        raise SpecError.at("out-of-range", f"rank={adapter.rank} is larger than {adapter.target}'s smaller "
                           f"dimension ({out_features}×{in_features}): B·A would have rank "
                           f"{min(out_features, in_features)} at most", line=bound.line,
                           column=bound.rule.span.column, source=ctx.source, filename=ctx.filename,
                           hint=f"use rank={min(out_features, in_features)} or less, or narrow the selector")


def fresh_tensors(graph: ModelGraph, site: BaseSite, adapter: Adapter, init: str) -> dict[str, torch.Tensor]:
    """A new adapter as PEFT initialises one (`init_lora_weights=True` or "gaussian")."""
    out_features, in_features = site_dims(site)
    a = torch.empty(adapter.rank, in_features)
    if init == "gaussian":
        nn.init.normal_(a, std=1 / adapter.rank)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    tensors = {"lora_A": a, "lora_B": torch.zeros(out_features, adapter.rank)}
    if adapter.method == "dora":  # ‖W + s·B·A‖ per output row, with B = 0
        tensors["lora_magnitude"] = torch.linalg.norm(base_weight(graph, site), dim=1)
    return tensors


def _merge(graph: ModelGraph, paths: list[str], bound: BoundRule, ctx: Context) -> None:
    try:
        merge_adapters(graph, paths)
    except MergeError as e:
        raise SpecError.at("illegal-order", str(e), line=bound.line, column=bound.rule.span.column,
                           source=ctx.source, filename=ctx.filename,
                           hint="write merge=false to keep the adapters beside the weights") from None


def _report(graph: ModelGraph, bound: BoundRule, inserted: list[Adapter], added: dict[str, int],
            before_bytes: int, notes: list[str]) -> RuleReport:
    rule: A.Adapt = bound.rule
    merged = bool(rule.get("merge"))
    trainable = 0 if merged else sum(added.values())
    total = graph_params(graph)
    params = sum(_numel(graph.targets[p]) for p in added if p in graph.targets)
    ranks = sorted({a.rank for a in inserted})
    details = {
        "adapters": len(inserted), "method": rule.method, "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": inserted[0].alpha if inserted else rule.get("alpha"), "merged": merged,
        "trainable_params": trainable, "trainable_share": trainable / total if total else 0.0,
    }
    if rule.get("from"):
        details["from"] = rule.get("from")
    after_bytes = before_bytes + (0 if merged else 4 * trainable)
    return RuleReport(bound.line, bound.text, rule.kind, tuple(added), params, params + trainable,
                      before_bytes, after_bytes, details, tuple(notes))


def _numel(target: Target) -> int:
    return sum(math.prod(s) for s in target.shapes)
