"""`tokens after <blocks> merge ratio=R protect=cls restore=true`: ToMe merging after each block.

After the residual stream leaves each selected block, `slimfx::token_merge` merges ⌊R·L⌋ of each
sequence's L tokens into their most similar tokens (bipartite soft matching by cosine of the
hidden states, size-weighted averages, sizes tracked across merges). This version merges in the
packed layout of `tokens unpad` (which must come first): each merged token keeps the batch and
position of the token it merged into, so every later consumer of the token index — attention per
sequence (its rows and columns of the original mask), rotary or position tables, the views'
packed length — is switched to the merge's index, and nothing with a sequence dim crosses the
merge point unswitched (a value that would is a SpecError naming its node). With `restore=true`
each output position takes the final value of the token it was merged into, so the output keeps
its length and mean pooling with the original mask is size-weighted.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ...dsl import ast as A
from ...runtime import token_ops
from ...runtime.report import RuleReport
from ..bind import BoundRule, graph_bytes, graph_params
from ..context import Context
from ..graph import ModelGraph
from .pack import PACKED
from .unpad import padded_batch, rule_error, timed

__all__ = ["run"]

RESTORE = "slimfx_restore"  # meta key of the gathers that give an output its merged tokens back
aten = torch.ops.aten


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Tokens = bound.rule
    index = _index_node(graph, bound, ctx)
    if "GenerationMixin" in graph.modules[""].classes:
        raise rule_error(bound, ctx, "unsupported", f"`tokens … merge` averages tokens, and {graph.model_class} is a "
                         "causal decoder: a merged token would see positions after its own",
                         "merge tokens of encoders (and ViTs); on decoders, `prune` (not implemented yet)")
    if not rule.get("restore"):
        raise rule_error(bound, ctx, "unsupported", "`tokens … merge restore=false` (the shorter sequence as the "
                         "output) is not implemented in this version", "write `restore=true`: every output "
                         "position gets the final value of the token it was merged into")
    probe = padded_batch(ctx)
    before = timed(graph, probe) if probe else None
    by_path = {b.path: b for b in graph.blocks}
    blocks = [by_path[b.path] for b in bound.blocks if b.path in by_path]
    if graph.blocks and graph.blocks[-1] in blocks:
        raise rule_error(bound, ctx, "out-of-range", f"a merge after the last block ({graph.blocks[-1].path}) saves "
                         "no work and only averages output tokens", "select blocks before the last, e.g. "
                         f"`blocks[1:{len(graph.blocks) - 1}]`")
    for block in sorted(blocks, key=lambda b: b.index):
        graph.reindex()
        _merge_after(graph, graph.blocks[block.index].output, index, rule, bound, ctx)
    graph.module.graph.lint()
    graph.module.recompile()
    details = {"blocks": [b.path for b in blocks], "ratio": rule.get("ratio")}
    notes = [f"ToMe merge of {rule.get('ratio'):.0%} of each sequence's tokens after "
             f"{', '.join(b.path for b in blocks)}"]
    if probe:
        details.update(_token_counts(graph, probe))
        after = timed(graph, probe)
        details.update(latency_ms_before=round(before, 2), latency_ms_after=round(after, 2))
        notes.append(f"first calibration batch: tokens per merge {details['tokens']}; one forward "
                     f"{before:.1f} → {after:.1f} ms (×{before / after:.2f})")
    params, nbytes = graph_params(graph), graph_bytes(graph)
    return RuleReport(bound.line, bound.text, "tokens", tuple(b.path for b in blocks), params, params, nbytes,
                      nbytes, details, tuple(notes))


def _index_node(graph: ModelGraph, bound: BoundRule, ctx: Context) -> fx.Node:
    for node in graph.module.graph.nodes:
        if node.target is token_ops.token_index:
            return node
    raise rule_error(bound, ctx, "unsupported", "`tokens … merge` works on the packed tokens of `tokens unpad` in "
                     "this version, and no `tokens unpad` comes before it",
                     "add `tokens unpad` above this rule (it is exact, and merging pays most on real tokens)")


def _merge_after(graph: ModelGraph, h: fx.Node, index: fx.Node, rule: A.Tokens, bound: BoundRule,
                 ctx: Context) -> None:
    g = graph.module.graph
    if PACKED not in h.meta:
        raise rule_error(bound, ctx, "unsupported", f"the residual stream leaving the block ({h.name}) is not on "
                         "packed tokens", "put `tokens unpad` above this rule")
    order = {n: i for i, n in enumerate(g.nodes)}
    later = [n for n in g.nodes if order[n] > order[h]]
    bi, si, n_tokens, sizes = _current_index(later, index)
    batch = next(n for n in g.nodes if n.target is aten.sym_size.int and n.args == (index.args[0], 0))
    _check_crossing(graph, h, later, {bi, si, n_tokens, sizes, batch, index}, bound, ctx)
    with g.inserting_after(h):
        merge = g.call_function(token_ops.token_merge, (h, sizes, bi, si, batch, float(rule.get("ratio")),
                                                        rule.get("protect") == "cls"))
    outs = []
    prev = merge
    for i in range(5):
        with g.inserting_after(prev):
            prev = g.call_function(operator.getitem, (merge, i))
        outs.append(prev)
    with g.inserting_after(prev):
        n_new = g.call_function(aten.sym_size.int, (outs[2], 0))
    x2, sizes2, bi2, si2, dest = outs
    _logical_meta(merge, outs, n_new, h, bi)
    x2.meta[PACKED] = h.meta[PACKED]
    if "nn_module_stack" in h.meta:  # the merge is part of its block: the merged stream is its output
        for node in (merge, *outs, n_new):
            node.meta["nn_module_stack"] = h.meta["nn_module_stack"]
    swap = {h: x2, bi: bi2, si: si2, n_tokens: n_new}
    if sizes is not None:
        swap[sizes] = sizes2
    for user in later:
        if user.target is token_ops.unpack_tokens:
            _restore(g, user, dest)
            continue
        user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda a: swap.get(a, a))


def _current_index(later, index: fx.Node):
    """(batch_index, seq_index, packed length, sizes) the nodes after the merge point read: the
    unpad's, or those of the last merge before it."""
    for node in later:
        if node.target is token_ops.packed_attention:
            bi, si = node.args[4], node.args[5]
            break
    else:
        raise ValueError("no attention after the merge point: merging after the last block changes nothing")
    n_tokens = next((n for n in bi.users if n.target is aten.sym_size.int), None)
    sizes = None
    if bi.target is operator.getitem and bi.args[0].target is token_ops.token_merge:
        sizes = next(u for u in bi.args[0].users if u.args[1] == 1)
    return bi, si, n_tokens, sizes


def _check_crossing(graph, h, later, index_nodes, bound, ctx) -> None:
    """Nothing packed may reach past the merge point except the stream itself and the index."""
    later_set = set(later)
    for node in graph.module.graph.nodes:
        if node is h or node in later_set or node in index_nodes:
            continue
        packed = PACKED in node.meta or node.target is token_ops.pack_tokens
        if packed and any(u in later_set for u in node.users):
            user = next(u for u in node.users if u in later_set)
            raise rule_error(bound, ctx, "unsupported", f"{node.name} holds one value per token from before the "
                             f"merge and is read after it (by {user.name}); the merge cannot make it follow",
                             "merge after another block")


def _restore(g: fx.Graph, unpack: fx.Node, dest: fx.Node) -> None:
    """unpack(x) → unpack(x[dest]): every position takes the value of the token it merged into.
    With several merges the gathers nest, the latest innermost."""
    inner = unpack
    while isinstance(inner.args[0], fx.Node) and inner.args[0].meta.get(RESTORE):
        inner = inner.args[0]
    x = inner.args[0]
    seq_dim = unpack.args[6]
    with g.inserting_before(inner):
        gather = g.call_function(aten.index_select.default, (x, seq_dim, dest))
    gather.meta["val"] = x.meta["val"]
    gather.meta[RESTORE] = True
    gather.meta[PACKED] = x.meta.get(PACKED)
    inner.args = (gather, *inner.args[1:])


def _logical_meta(merge, outs, n_new, h, bi) -> None:
    """Logical values (the padded layout's shapes), as every packed node keeps."""
    x2, sizes2, bi2, si2, dest = outs
    merge.meta["val"] = (h.meta["val"], bi.meta["val"].float(), bi.meta["val"], bi.meta["val"], bi.meta["val"])
    for node, val in zip(outs, merge.meta["val"]):
        node.meta["val"] = val
    n_new.meta["val"] = bi.meta["val"].shape[0]


def _token_counts(graph: ModelGraph, probe: dict) -> dict:
    """Real tokens before each merge and after the last, on one calibration batch."""
    merges = [n for n in graph.module.graph.nodes if n.target is token_ops.token_merge]
    interp = _Counting(graph.module, merges)
    with torch.no_grad():
        interp.run(*[probe[i.name] for i in graph.inputs])
    return {"tokens": [f"{interp.counts[m][0]}→{interp.counts[m][1]}" for m in merges if m in interp.counts]}


class _Counting(fx.Interpreter):
    def __init__(self, gm, merges):
        super().__init__(gm)
        self.merges, self.counts = set(merges), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.merges:
            self.counts[n] = (int(self.env[n.args[0]].shape[1]), int(out[0].shape[1]))
        return out
