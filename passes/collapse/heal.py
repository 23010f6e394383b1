"""`heal method=linear|lora …`: repair what the `collapse`/`drop` rules before it removed.

Every heal repairs every cut made so far (ctx.cuts; a collapse/drop may not follow a heal), so
`heal method=linear` then `heal method=lora distill=true` stack: the map first, LoRA on top.

- linear: per cut, in model order, X = the residual stream entering the gap (the graph as it is
  now, earlier maps applied), Y = what left the removed run before it was removed; T from
  fit.py, applied as one `aten.linear(h, Tᵀ)` on the stream (`h ← h @ T`, a d×d buffer). With
  `fold=true` T is fitted on the previous block's MLP output instead and folded into its down
  projection (ReplaceMe, 2025): no new op, a little worse (DESIGN.md).
- lora: LoRA adapters (passes/lora.py) on every linear of the blocks on both sides of each cut,
  trained with runtime/train.py on the calibration batches (next-token loss, or KL to the
  uncompressed model's logits with `distill=true`) at a constant lr or, with `schedule=cosine`,
  a warm-up then a cosine decay; merged afterwards unless `merge=false`; `generate=N` adds
  batches of N tokens the uncompressed model writes (teacher_text.py).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from ...dsl import ast as A
from ...runtime.adapter_merge import MergeError, check_mergeable, merge_adapters
from ...runtime.adapters import Adapter, is_adapter_param
from ...runtime.program import ParamInfo
from ...runtime.report import RuleReport
from ...runtime.train import Diverged, train
from ..bind import BoundRule
from ..block_reads import HEAL_MAP, is_heal_map
from ..graph_sizes import graph_bytes, graph_params
from ..calibrate import observe
from ..context import Context
from ..graph import ModelGraph, Target
from ..heal_rules import (ADAPTED, MAPPED, REFORMATTED, fold_block_problem, fold_sum_problem, fold_target_problem,
                          fold_tied_problem, merge_problem, no_linear_problem, residual_sum)
from ..lent import replace_tensor
from ..lora import base_sites, has_adapter, insert_adapter, site_dims
from ..rewrite import PassError, find_sites, has_weight, register_tensors, set_meta, shared_outside
from .apply import need_calibration, rule_error
from .cut import Cut
from .fit import fit_map
from .teacher_text import PROMPT, WriteError, check_writer, teacher_batches, written_batch_count
from ...runtime.forward_parts import recompile
from ...runtime.inputs import complete_inputs

__all__ = ["run"]

aten = torch.ops.aten


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Heal = bound.rule
    if not ctx.cuts:
        raise rule_error(bound, ctx, "illegal-order", "`heal` found nothing to repair: the rules before it "
                         "removed no block (an auto search may have accepted none: see its report)",
                         "put `heal` after a `collapse` or `drop` that removes blocks, or lower the search's threshold")
    need_calibration(bound, ctx, "fits and trains on calibration tokens")
    if any(not c.target for c in ctx.cuts):
        raise rule_error(bound, ctx, "missing-value", "`heal` needs what the removed blocks output on the "
                         "calibration tokens, and none was recorded when they were removed")
    for cut in ctx.cuts:  # the records served later collapse/drop rules, and none may follow a heal
        cut.record = {}
    before = graph_params(graph), graph_bytes(graph)
    if rule.get("method") == "linear":
        details, notes = (_fold if rule.get("fold") else _linear)(graph, bound, ctx)
    else:
        details, notes = _lora(graph, bound, ctx)
    return RuleReport(bound.line, bound.text, rule.kind, tuple(p for c in ctx.cuts for p in c.removed),
                      before[0], graph_params(graph), before[1], graph_bytes(graph), details,
                      tuple(notes) + bound.warnings)


# ---- linear ------------------------------------------------------------------------------------


def _observe_rows(graph: ModelGraph, node: fx.Node, ctx: Context, what: str) -> list[torch.Tensor]:
    rows: list[torch.Tensor] = []
    observe(graph, {node: [lambda r: rows.append(r.clone())]}, ctx.calib, ctx.progress, what)
    return rows


def _linear(graph: ModelGraph, bound: BoundRule, ctx: Context):
    fits = []
    for k, cut in enumerate(ctx.cuts):
        xs = _observe_rows(graph, cut.stream, ctx, f"fitting the map at cut {k + 1}/{len(ctx.cuts)}")
        fit = fit_map(xs, cut.target)
        cut.stream = _apply_map(graph, cut, fit.map, f"{HEAL_MAP}{_serial(graph, cut)}")
        fits.append((cut, fit))
    tokens = sum(int(x.shape[0]) for x in xs)  # every cut observes the same calibration rows
    d = fits[0][1].map.shape[0]
    details = {"calib_tokens": tokens, "cuts": [{"removed": list(c.removed), "residual_before": f.residual_before,
                                                 "residual_after": f.residual_after} for c, f in fits]}
    where = "at the cut" if len(fits) == 1 else f"at each of {len(fits)} cuts"
    notes = [f"a {d}×{d} map {where}; "
             "fit residual ‖XT − Y‖/‖Y‖: " + ", ".join(f"{f.residual_before:.3f} → {f.residual_after:.3f}"
                                                       for _, f in fits)]
    if tokens < FEW_ROWS * d:
        notes.append(f"fitted on {tokens:,} calibration tokens, fewer than {FEW_ROWS}× the map's width: more "
                     "text generalizes better (SmolLM2, 4 blocks removed: ×1.278 of fp32 perplexity on the "
                     "default 3,072 tokens, ×1.235 on 25,000) — pass calib= more text, or calib=25000 "
                     "(`--calib-tokens 25000`) for that many tokens of built-in text")
    return details, notes


# The map has d² unknowns and each calibration token gives d equations; on SmolLM2 (d = 576)
# the default's 3k tokens gave ×1.278; with 6k, 12k, 25k, 108k tokens of docstrings added ×1.228,
# ×1.223, ×1.218, ×1.224 (a prototype; benchmarks/README.md, collapse section): below about 10·d
# tokens the map fits the calibration text, not the model.
FEW_ROWS = 10


def _serial(graph: ModelGraph, cut: Cut) -> str:
    """A name suffix not yet used on the container of the blocks: `_3` for the map in front of
    block model.layers.3, `_end` after the last block (`_3_1` for a second map there)."""
    owner = graph.module.get_submodule(graph.blocks_path)
    base = f"_{cut.after.rpartition('.')[2]}" if cut.after is not None else "_end"
    name, i = base, 0
    while hasattr(owner, f"{HEAL_MAP}{name}"):
        i += 1
        name = f"{base}_{i}"
    return name


def _apply_map(graph: ModelGraph, cut: Cut, t: torch.Tensor, name: str) -> fx.Node:
    """h ← h @ T on the stream at the cut; returns the new stream node.

    The map is a buffer of the blocks' container (a block's own tensors would make it unlike the
    other blocks); its node belongs to the block after the cut (its first op, so that block still
    reads the previous block's output) or, after the last block, to the container. T (fitted in
    float64, returned float32) is stored in the stream's dtype: a half model's linear refuses a
    float32 weight beside half activations."""
    gm, stream, path = graph.module, cut.stream, graph.blocks_path
    first_user = min(stream.users, key=graph.node_order.__getitem__)
    t = t.to(stream.meta["val"].dtype)
    weight = register_tensors(graph, path, {name: t.T.contiguous()}, first_user)[name]
    with gm.graph.inserting_before(first_user):
        new = gm.graph.call_function(aten.linear.default, (stream, weight))
    home = cut.after if cut.after is not None else path
    like = next((n for n in graph.module_nodes.get(home, ()) if "nn_module_stack" in n.meta), None)
    set_meta(new, first_user, aten.linear.default, (stream, weight), {})
    new.meta["nn_module_stack"] = _stack_to(like, home) if like is not None else {}
    stream.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    info = graph.modules[path]
    graph.modules[path] = replace(info, params=info.params + (ParamInfo(
        f"{path}.{name}" if path else name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size(),
        _new_storage(graph), is_buffer=True),))
    recompile(gm)
    graph.reindex()
    return new


def _stack_to(node: fx.Node, path: str) -> dict:
    """The node's nn_module_stack cut after the entry for module `path`."""
    out = {}
    for key, entry in node.meta["nn_module_stack"].items():
        out[key] = entry
        name = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(name, str) and name.replace("[", ".").replace("]", "") == path:
            break
    return out


def _new_storage(graph: ModelGraph) -> int:
    return 1 + max((p.storage for m in graph.modules.values() for p in m.params), default=0)


def _fold(graph: ModelGraph, bound: BoundRule, ctx: Context):
    """ReplaceMe: T fitted on the previous block's MLP output M (Y − rest ≈ M·T, rest = h − M) and
    folded into its down projection: W ← Tᵀ·W, b ← b·T (Conv1D: W ← W·T)."""
    fits = []
    for cut in ctx.cuts:
        down, out = _down_before(graph, cut, bound, ctx)
        site = find_sites(graph, down)[0]
        ms, hs = [], []
        observe(graph, {site.node: [lambda r: ms.append(r.clone())], out: [lambda r: hs.append(r.clone())]},
                ctx.calib, ctx.progress, f"fitting the folded map before {cut.removed[0]}")
        rest = [h - m for h, m in zip(hs, ms)]
        fit = fit_map(ms, [y - r for y, r in zip(cut.target, rest)])
        _fold_into(graph, site, fit.map)
        fits.append((cut, fit))
    details = {"fold": True, "cuts": [{"removed": list(c.removed), "residual_before": f.residual_before,
                                       "residual_after": f.residual_after} for c, f in fits]}
    notes = [f"maps folded into {len(fits)} down projections; fit residual on the MLP output: "
             + ", ".join(f"{f.residual_before:.3f} → {f.residual_after:.3f}" for _, f in fits)]
    return details, notes


def _down_before(graph: ModelGraph, cut: Cut, bound: BoundRule, ctx: Context):
    """The down projection of the block before the cut, and that block's output, when the output
    is the residual sum `h + down(…)` (a pre-norm block); else a SpecError saying why not."""
    block = next((b for b in graph.blocks if b.path == cut.before), None)
    problem = fold_block_problem(graph, block)
    if problem is not None:
        raise rule_error(bound, ctx, "unsupported", *problem)
    downs = graph.by_role("mlp.down", block.index)
    down = downs[0].path
    refused = fold_target_problem(down, down in bound.protected, _cannot_fold_into(graph, downs[0], cut))
    if refused is not None:
        raise rule_error(bound, ctx, *refused)
    if shared_outside(graph, downs[0], {down}):  # the graph reads a tied tensor under one name
        raise rule_error(bound, ctx, "unsupported", *fold_tied_problem(down))
    problem = fold_sum_problem(graph, block, cut.stream)
    if problem is not None:
        raise rule_error(bound, ctx, "unsupported", *problem)
    return downs[0], residual_sum(cut.stream)


def _cannot_fold_into(graph: ModelGraph, down: Target, cut: Cut) -> str | None:
    """Why an earlier rule leaves no float weight of `down` to fold into, or a map already at the
    cut; None if nothing does (a raw PassError, or a message blaming the block's form, before)."""
    if not has_weight(down):
        return REFORMATTED
    if has_adapter(graph, down.path):
        return ADAPTED
    if is_heal_map(cut.stream):
        return MAPPED
    return None


def _fold_into(graph: ModelGraph, site, t: torch.Tensor) -> None:
    gm = graph.module
    w = _fetch(gm, site.weight)
    # new tensors, never written in place: the old ones may be the user's own storage (lent.py);
    # a half weight is folded in float32 and rounded once back to its own dtype
    with torch.no_grad():
        folded = w.float() @ t if site.transposed else t.T @ w.float()
        replace_tensor(gm, w, folded.to(w.dtype))
        if site.bias is not None:
            b = _fetch(gm, site.bias)
            replace_tensor(gm, b, (b.float() @ t).to(b.dtype))


def _fetch(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    if node.op != "get_attr":
        raise PassError(f"{node.format_node()}: expected a weight read (get_attr)")
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


# ---- lora --------------------------------------------------------------------------------------


class _Student:
    """What runtime/train.py trains: the graph, called like the model, with these adapters."""

    def __init__(self, graph: ModelGraph, params: list[torch.nn.Parameter]):
        self.graph, self.params = graph, params

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return self.params

    def __call__(self, **inputs):
        return self.graph(**inputs)


def _lora(graph: ModelGraph, bound: BoundRule, ctx: Context):
    rule = bound.rule
    distill, written, steps = bool(rule.get("distill")), rule.get("generate"), rule.get("steps")
    if distill and ctx.reference is None:
        raise rule_error(bound, ctx, "missing-value", "`heal … distill=true` needs the uncompressed model")
    if written:  # checked before anything is written or inserted: text no step reaches is minutes lost
        _check_generate(bound, ctx, steps, written)
    reach = rule.get("reach")
    paths, blocks, held = _neighbour_linears(graph, ctx.cuts, reach)
    kept = [p for p in paths if p in bound.protected]  # `keep`: no adapter merged into them
    paths = [p for p in paths if p not in bound.protected]
    if not paths:
        raise _no_linear(bound, ctx, blocks, held, len(kept))
    rank = rule.get("rank")
    inserted, ranks = [], set()
    seeded = torch.Generator().manual_seed(0)  # the same policy heals the same way; the caller's RNG untouched
    with ctx.progress.task(f"adding healing adapters (line {bound.line})", total=len(paths)) as step:
        for path in paths:
            target = graph.targets[path]
            site = base_sites(graph, target)[0]
            r = min(rank, *site_dims(site))
            ranks.add(r)
            adapter = Adapter(path, "lora", r, 2.0 * r, 0.0, site.transposed)
            out_f, in_f = site_dims(site)
            a = torch.empty(r, in_f)
            torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=seeded)
            insert_adapter(graph, graph.targets[path], adapter, {"lora_A": a, "lora_B": torch.zeros(out_f, r)})
            inserted.append(path)
            step(note=path)
    recompile(graph.module)
    graph.reindex()
    if rule.get("merge"):  # refused before the training, not after it
        _check_merge(graph, inserted, bound, ctx)
    # Only the heal's own adapters: an earlier compile's summed every step's gradient into their
    # .grad, and a user's loop then stepped with it (the CompiledModel makes them trainable again).
    own = set(inserted)
    for name, p in graph.module.named_parameters():
        p.requires_grad_(is_adapter_param(name) and name.rsplit(".", 1)[0] in own)
    params = [p for n, p in graph.module.named_parameters() if p.requires_grad]
    batches = ctx.calib
    if written:
        try:
            text = teacher_batches(ctx.reference, ctx.calib, written, ctx.progress)
        except WriteError as e:
            raise _cannot_write(bound, ctx, written, e) from None
        batches = ctx.calib + [complete_inputs(b, graph.inputs) for b in text]
    schedule = rule.get("schedule")
    try:
        result = train(_Student(graph, params), batches, steps=steps, lr=rule.get("lr"), schedule=schedule,
                       loss="distill" if distill else "lm", teacher=ctx.reference if distill else None,
                       progress=ctx.progress)
    except ValueError as e:
        raise rule_error(bound, ctx, "unsupported", f"`heal method=lora` cannot train here: {e}",
                         "write distill=true to learn the original model's outputs") from None
    except Diverged as e:
        if not e.updated:
            raise rule_error(bound, ctx, "unsupported", f"`heal method=lora` cannot train here: {e.what}, before "
                             "any update: the model's outputs on the calibration batch are not finite") from None
        raise rule_error(bound, ctx, "out-of-range", f"`heal method=lora` training diverged: {e.what}",
                         f"write a lower lr= (this one is {rule.get('lr'):g})") from None
    recompile(graph.module)
    if rule.get("merge"):
        try:  # asked before the training (_check_merge): nothing that it reads has changed since
            merge_adapters(graph, inserted)
        except MergeError as e:
            raise _merge_refused(bound, ctx, e) from None
    # a rank is at most a linear's smaller side: the report says the ranks the adapters have
    details = {"adapters": len(inserted), "blocks": blocks, "rank": max(ranks), "steps": steps, "loss": result.loss,
               "schedule": schedule,
               "generated_tokens": sum(b["input_ids"][:, PROMPT:].numel() for b in batches[len(ctx.calib):]),
               "first_loss": result.first, "last_loss": result.last, "merged": bool(rule.get("merge"))}
    # Steps cycle through the batches: with written text the first and last step read different
    # text, and the note says which, so a rising pair is not taken for a heal that got worse.
    last_written = written and (len(result.losses) - 1) % len(batches) >= len(ctx.calib)
    where = "beside the cuts" if reach == 1 else f"of {len(blocks)} blocks within {reach} of the cuts"
    cosine = " (cosine lr)" if schedule == "cosine" else ""
    used = f"r={max(ranks)}" if len(ranks) == 1 else f"r={min(ranks)}–{max(ranks)}"
    capped = f" (rank={rank} capped at the linears' sizes)" if max(ranks) < rank else ""
    notes = [f"LoRA {used}{capped} on {len(inserted)} linears {where}, {len(result.losses)} steps{cosine} of "
             f"{result.loss} loss: {result.first:#.4g} → {result.last:#.4g}"
             + (" (first step on calibration text, last on written text)" if last_written else "")
             + (f"; on the calibration batches and {details['generated_tokens']:,} tokens the uncompressed "
                "model wrote" if written else "")
             + ("; merged into the weights" if rule.get("merge") else "; kept as trainable adapters")]
    if kept:
        notes.append(f"{len(kept)} linear{'s' * (len(kept) != 1)} near the cuts protected by `keep`, left without "
                     "adapters")
    return details, notes


def _no_linear(bound: BoundRule, ctx: Context, blocks: list[str], held: bool, kept: int):
    return rule_error(bound, ctx, "unsupported", *no_linear_problem(blocks, held, kept))


def _check_merge(graph: ModelGraph, inserted: list[str], bound: BoundRule, ctx: Context) -> None:
    try:
        check_mergeable(graph, inserted)
    except MergeError as e:
        raise _merge_refused(bound, ctx, e) from None


def _merge_refused(bound: BoundRule, ctx: Context, e: MergeError):
    return rule_error(bound, ctx, *merge_problem(str(e)))


def _check_generate(bound: BoundRule, ctx: Context, steps: int, written: int) -> None:
    """`generate=` needs the uncompressed model, one that can write, and steps that reach every
    written batch (they go through the calibration batches first): SpecErrors at the rule."""
    if ctx.reference is None:
        raise rule_error(bound, ctx, "missing-value", "`heal … generate=` needs the uncompressed model to write "
                         "with", "compile the model itself, not a graph without it")
    try:
        check_writer(ctx.reference)
    except WriteError as e:
        raise _cannot_write(bound, ctx, written, e) from None
    reached, needed = steps - len(ctx.calib), written_batch_count(ctx.reference, written)
    if reached < needed:
        raise rule_error(bound, ctx, "unsupported",
                         f"`heal … steps={steps} generate={written}`: the text fills {needed} batches, but "
                         f"the steps reach {max(reached, 0)} of them after the {len(ctx.calib)} calibration "
                         f"batches", f"write steps={len(ctx.calib) + needed} or more, or a smaller generate=")


def _cannot_write(bound: BoundRule, ctx: Context, written: int, e: WriteError):
    return rule_error(bound, ctx, "unsupported", f"`heal … generate={written}` cannot write text: {e}", e.hint)


def _neighbour_linears(graph: ModelGraph, cuts: list[Cut], reach: int) -> tuple[list[str], list[str], bool]:
    """Every linear (no adapter on it yet) of the blocks up to `reach` blocks before and after each
    cut, those blocks' paths in model order, and whether some of their linears already carry an
    adapter. reach=1: the block just before and just after. No linear at all: the caller says why."""
    order = [b.path for b in graph.blocks]
    near: set[str] = set()
    for c in cuts:
        if c.before is not None:
            i = order.index(c.before)
            near.update(order[max(0, i - reach + 1):i + 1])
        if c.after is not None:
            j = order.index(c.after)
            near.update(order[j:j + reach])
    blocks = [p for p in order if p in near]
    linears = [t.path for t in graph.targets.values() if t.kind == "linear" and t.block is not None
               and graph.blocks[t.block].path in near]
    chosen = [p for p in linears if not has_adapter(graph, p)]
    return chosen, blocks, len(chosen) < len(linears)

