"""`adapt <linears> lora|dora rank= alpha= dropout= init= dtype= merge= from=`: trainable adapters.

    adapt blocks.*.attn.{q,v} lora rank=16 alpha=32
    adapt blocks.*.** : Linear dora rank=32 alpha=64 dropout=0.05
    adapt blocks.*.attn.{q,v} lora from="adapters/support-bot" merge=true

Each target's linear — nn.Linear, Conv1D, or one a `quantize` already packed (QLoRA) — gets the
adapter of passes/lora.py. A fresh adapter starts as PEFT's does (A: kaiming-uniform with
a=√5, or normal with std 1/r; B: zeros; DoRA's magnitude: the row norms of the base weight), so
the compiled model's outputs are bit-identical to the original's until it trains. `init=error`
starts each adapter instead from the error a `quantize` before it left in the weight
(passes/adapters/error_init.py), so the model starts closer to the unquantized one. `from=` reads
a PEFT adapter directory instead (passes/peft_in.py). `dtype=fp16|bf16` stores A and B
rounded to half precision (passes/adapters/storage.py). `merge=true` folds the adapters into the
base weights right away (runtime/adapter_merge.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...dsl import ast as A
from ...dsl.errors import SpecError
from ...runtime.adapter_merge import MergeError, merge_adapters
from ...runtime.adapters import Adapter, is_adapter_param
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..graph_sizes import graph_params
from ..context import Context
from ..graph import ModelGraph, Target
from ..lora import BaseSite, base_sites, base_weight, has_adapter, insert_adapter, site_dims
from .. import peft_in
from .error_init import ErrorFigures, error_details, error_note, fit_error_adapters
from .storage import STORED_DTYPES, store_as
from ...runtime.forward_parts import recompile

__all__ = ["run", "fresh_tensors"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Adapt = bound.rule
    loaded = peft_in.read(rule.get("from"), bound, ctx) if rule.get("from") else None
    dtype = STORED_DTYPES[rule.get("dtype")]
    added, adapters, base, fits = {}, {}, {}, {}

    def put(target: Target, adapter: Adapter, tensors: dict[str, torch.Tensor]) -> None:
        base[target.path] = _base_size(graph, target, base_sites(graph, target)[0])
        insert_adapter(graph, target, adapter, tensors)  # recompiled once, below
        added[target.path] = (sum(v.numel() for v in tensors.values()), sum(v.nbytes for v in tensors.values()))
        adapters[target.path] = adapter

    if rule.get("init") == "error":
        fits = _error_fits(graph, bound, ctx, dtype, put)
    else:
        # The same policy draws the same adapters, and the caller's RNG is left alone (two compiles
        # gave different lora_A, and each advanced the user's torch.manual_seed stream)
        seeded = torch.Generator().manual_seed(bound.line)
        with ctx.progress.task(f"adding {rule.method} adapters (line {bound.line})",
                               total=len(bound.targets)) as step:
            for t in bound.targets:
                target = _current(graph, t, bound, ctx)
                sites = base_sites(graph, target)
                if loaded is not None:
                    adapter, tensors = loaded.adapter(target, sites[0])
                    tensors = store_as(tensors, dtype)
                else:
                    adapter = _new_adapter(target, sites[0], bound, ctx)
                    tensors = store_as(fresh_tensors(graph, sites[0], adapter, rule.get("init"), seeded), dtype)
                put(target, adapter, tensors)
                step(note=target.path)
    inserted = [adapters[t.path] for t in bound.targets]  # rule order (init=error inserts in graph order)
    recompile(graph.module)
    notes = list(bound.warnings)
    if rule.get("merge"):
        _merge(graph, [a.target for a in inserted], bound, ctx)
        if loaded is None:
            notes.append("fresh adapters are zero (B = 0): merging them left every weight as it was; use "
                         "merge=false to train them, or from=\"dir\" to merge a trained adapter")
    return _report(graph, bound, inserted, added, base, notes, fits)


def _error_fits(graph: ModelGraph, bound: BoundRule, ctx: Context, dtype: torch.dtype, put) -> dict:
    """`init=error`: every adapter fitted along one calibration sweep (error_init.py) and put into
    the graph as soon as it is fitted, so each fit sees the quantized model with the adapters of
    the linears before it (as sequential GPTQ sees the blocks before it compressed); path -> its
    fit's errors."""
    adapters = {}
    for t in bound.targets:
        target = _current(graph, t, bound, ctx)
        adapters[t.path] = _new_adapter(target, base_sites(graph, target)[0], bound, ctx)
    return fit_error_adapters(graph, bound, ctx, adapters, dtype,
                              lambda path, tensors: put(graph.targets[path], adapters[path], tensors))


def _new_adapter(target: Target, site: BaseSite, bound: BoundRule, ctx: Context) -> Adapter:
    """The rule's adapter for this target, its rank checked against the weight."""
    rule = bound.rule
    adapter = Adapter(target.path, rule.method, rule.get("rank"), rule.get("alpha"), rule.get("dropout"),
                      site.transposed)
    _check_rank(adapter, site, bound, ctx)
    return adapter


def _current(graph: ModelGraph, t: Target, bound: BoundRule, ctx: Context) -> Target:
    target = graph.targets.get(t.path)
    if target is None:
        raise SpecError.at("unsupported", f"{t.path} is no longer in the graph (an earlier rule removed it), "
                           f"so `{bound.text}` cannot adapt it", line=bound.line, column=bound.rule.span.column,
                           source=ctx.source, filename=ctx.filename, hint="narrow the selector")
    if t.path in ctx.inherited_adapters:
        raise SpecError.at("unsupported", f"{t.path} already carries an adapter: the CompiledModel this policy "
                           f"compiles came with it, so `{bound.text}` cannot add another", line=bound.line,
                           column=bound.rule.span.column, source=ctx.source, filename=ctx.filename,
                           hint="merge its adapters first (`slimfx.compile(cm.merge_adapters(), …)`), or narrow "
                           "the selector to leave the adapted linears out")
    if has_adapter(graph, t.path):  # only a rule run before this one can have put it there
        raise SpecError.at("unsupported", f"{t.path} already carries an adapter from an earlier rule (a `heal "
                           "method=lora merge=false` keeps its adapters on the linears beside the cuts), so "
                           f"`{bound.text}` cannot add another", line=bound.line, column=bound.rule.span.column,
                           source=ctx.source, filename=ctx.filename,
                           hint="narrow the selector to leave the healed linears out, or let the heal merge "
                           "its adapters (merge=true, the default)")
    return target


def _check_rank(adapter: Adapter, site: BaseSite, bound: BoundRule, ctx: Context) -> None:
    out_features, in_features = site_dims(site)
    if adapter.rank > min(out_features, in_features):
        raise SpecError.at("out-of-range", f"rank={adapter.rank} is larger than {adapter.target}'s smaller "
                           f"dimension ({out_features}×{in_features}): B·A would have rank "
                           f"{min(out_features, in_features)} at most", line=bound.line,
                           column=bound.rule.span.column, source=ctx.source, filename=ctx.filename,
                           hint=f"use rank={min(out_features, in_features)} or less, or narrow the selector")


def fresh_tensors(graph: ModelGraph, site: BaseSite, adapter: Adapter, init: str,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A new adapter as PEFT initialises one (`init_lora_weights=True` or "gaussian")."""
    out_features, in_features = site_dims(site)
    a = torch.empty(adapter.rank, in_features)
    if init == "gaussian":
        nn.init.normal_(a, std=1 / adapter.rank, generator=generator)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
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


def _base_size(graph: ModelGraph, target: Target, site: BaseSite) -> tuple[int, int]:
    """(parameters, stored bytes) of the target's base linear as it is now (packed or not)."""
    out_features, in_features = site_dims(site)
    stored = [p for p in graph.modules[target.path].params if not is_adapter_param(p.name)]
    bias = site.node.meta["val"].shape[-1] if site.bias is not None else 0
    return out_features * in_features + bias, sum(p.nbytes for p in stored)


def _report(graph: ModelGraph, bound: BoundRule, inserted: list[Adapter], added: dict[str, tuple[int, int]],
            base: dict[str, tuple[int, int]], notes: list[str], fits: dict[str, ErrorFigures]) -> RuleReport:
    rule: A.Adapt = bound.rule
    merged = bool(rule.get("merge"))
    trainable = 0 if merged else sum(n for n, _ in added.values())
    total = graph_params(graph)
    ranks = sorted({a.rank for a in inserted})
    alphas = sorted({a.alpha for a in inserted})
    details = {
        "adapters": len(inserted), "method": rule.method, "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas, "merged": merged,
        "trainable_params": trainable, "trainable_share": trainable / total if total else 0.0,
    }
    if rule.get("from"):
        details["from"] = rule.get("from")
    if rule.get("dtype") != "fp32":
        details["dtype"] = rule.get("dtype")
    if fits:
        details.update(error_details(fits))
        notes.append(error_note(fits))
    what = f"{rule.method} r={'/'.join(map(str, ranks))} α={'/'.join(f'{a:g}' for a in alphas)}"
    what += f" {rule.get('dtype')}" if "dtype" in details else ""
    if merged:
        notes.insert(0, f"{len(inserted)} {what} adapters merged into their weights")
    else:
        notes.insert(0, f"{len(inserted)} {what} adapters: {trainable:,} trainable parameters "
                        f"({details['trainable_share']:.2%} of the model)")
    params = sum(p for p, _ in base.values())
    before = sum(b for _, b in base.values())
    after = before + (0 if merged else sum(nbytes for _, nbytes in added.values()))
    return RuleReport(bound.line, bound.text, rule.kind, tuple(added), params, params + trainable,
                      before, after, details, tuple(notes))
