"""What `tokens after … merge|prune` share: an op that changes the packed tokens after a block, and
every later reader of the token index switched to its outputs.

Such an op keeps some tokens (each at the batch and position of a token of its input) and says
where each input token went (`dest`); the token index of `tokens unpad` (batch and position per
packed token) becomes the op's, so attention per sequence, rotary or position tables and the
views' packed length follow; nothing else with one value per token may cross the op (a SpecError
names the node). The outputs are restored through the `dest` maps: every position takes the final
value of the token it went to (nested gathers, the latest innermost).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ...runtime import token_ops
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from .pack import PACKED
from .unpad import rule_error

__all__ = ["innermost_restore", "descendants", "selected_blocks", "insert_after", "token_counts", "block_attention",
           "TOKEN_OPS"]

RESTORE = "slimfx_restore"  # meta key of the gathers that give an output its tokens back
aten = torch.ops.aten
TOKEN_OPS = {token_ops.token_merge, token_ops.token_prune}


def selected_blocks(graph: ModelGraph, bound: BoundRule, ctx: Context) -> list:
    """The bound blocks as the graph indexes them now, in order; never the last block."""
    by_path = {b.path: b for b in graph.blocks}
    blocks = sorted((by_path[b.path] for b in bound.blocks if b.path in by_path), key=lambda b: b.index)
    if graph.blocks and graph.blocks[-1] in blocks:
        raise rule_error(bound, ctx, "out-of-range", f"a `{bound.rule.action}` after the last block "
                         f"({graph.blocks[-1].path}) saves no work and only changes output tokens",
                         f"select blocks before the last, e.g. `blocks[1:{len(graph.blocks) - 1}]`")
    return blocks


def insert_after(graph: ModelGraph, block, op, params: tuple, bound: BoundRule,
                 ctx: Context, proportional: bool = False, per_token=None) -> fx.Node:
    """Insert `op(h, sizes, batch_index, seq_index, batch, *params[, per_token])` — an op with
    token_merge's outputs (x, sizes, batch_index, seq_index, dest) — after the residual stream `h`
    leaving `block`, and switch every later reader of the token index to its outputs.
    `per_token(graph, attention)`, when given, builds the op's last input (a similarity metric or
    a score) from the block's own attention node; it inserts at the merge point."""
    g = graph.module.graph
    h = block.output
    if PACKED not in h.meta:
        raise rule_error(bound, ctx, "unsupported", f"the residual stream leaving the block ({h.name}) is not on "
                         "packed tokens", "put `tokens unpad` above this rule")
    order = {n: i for i, n in enumerate(g.nodes)}
    later = [n for n in g.nodes if order[n] > order[h]]
    try:
        bi, si, batch, n_tokens, sizes = _current_index(later)
    except ValueError as e:
        raise rule_error(bound, ctx, "unsupported", f"`tokens … {bound.rule.action}` after {h.name}: {e}",
                         "token rules need attention that runs per sequence after `tokens unpad`") from None
    _check_crossing(graph, h, later, {bi, si, n_tokens, sizes, batch}, bound, ctx)
    args = (h, sizes, bi, si, batch, *params)
    with g.inserting_before(h.next):  # nodes created here follow h in the order they are made
        if per_token is not None:
            args = (*args, per_token(g, block_attention(graph, block, bound, ctx)))
        merge = g.call_function(op, args)
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
        if _unpacking(user):
            continue  # an output's unpack reads its value on that value's own index (below)
        user.args, user.kwargs = fx.node.map_arg((user.args, user.kwargs), lambda a: swap.get(a, a))
        if proportional and user.target is token_ops.packed_attention:
            user.args = (*user.args[:10], sizes2)  # keys weighted by the tokens each holds
    # Unpacks sit at the graph's end, yet one may unpack a value from before the merge (a hidden
    # state of output_hidden_states, the stream h itself): that one is exact as it is. Only what
    # the merge's tokens computed is restored through `dest`.
    merged = descendants(merge)
    for user in later:
        if user.target is token_ops.unpack_tokens and innermost_restore(user).args[0] in merged:
            _restore(g, user, dest)
    return merge


def _unpacking(node: fx.Node) -> bool:
    """An unpack or one of its restoring gathers: it reads a packed value with the index (and the
    `dest` maps) of that value's own tokens, whichever step made them."""
    return node.target is token_ops.unpack_tokens or bool(node.meta.get(RESTORE))


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node computed from `node`'s value."""
    seen, todo = set(), [node]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def block_attention(graph: ModelGraph, block, bound: BoundRule, ctx: Context) -> fx.Node:
    """The block's one attention that runs per sequence (its queries and keys score tokens)."""
    found = [n for n in graph.module.graph.nodes if n in block.nodes and n.target is token_ops.packed_attention]
    if len(found) != 1:
        what = f"{len(found)} such ops" if found else "none (attention written out by hand stays padded)"
        raise rule_error(bound, ctx, "unsupported", f"`{bound.text}` reads the attention of {block.path}, which must be one scaled_dot_product_attention "
                         f"running per sequence; it has {what}", "use `score=norm` (prune) or `by=hidden` (merge), which need no attention of the block")
    return found[0]


def _current_index(later):
    """(batch_index, seq_index, batch, packed length, sizes) the nodes after the merge point read:
    the unpad's, or those of the last merge before it."""
    for node in later:
        if node.target is token_ops.packed_attention:
            bi, si, batch = node.args[4], node.args[5], node.args[6]
            break
    else:
        raise ValueError("no attention after it runs per sequence (attention written out by hand stays padded)")
    n_tokens = next((n for n in bi.users if n.target is aten.sym_size.int), None)
    sizes = None
    if bi.target is operator.getitem and bi.args[0].target in TOKEN_OPS:
        sizes = next(u for u in bi.args[0].users if u.args[1] == 1)
    return bi, si, batch, n_tokens, sizes


def _check_crossing(graph, h, later, index_nodes, bound, ctx) -> None:
    """Nothing packed may reach past the merge point except the stream itself and the index (and
    an unpack, which reads it on its own tokens: a hidden state output_hidden_states returns)."""
    later_set = set(later)
    for node in graph.module.graph.nodes:
        if node is h or node in later_set or node in index_nodes:
            continue
        packed = PACKED in node.meta or node.target is token_ops.pack_tokens
        readers = [u for u in node.users if u in later_set and not _unpacking(u)]
        if packed and readers:
            user = readers[0]
            raise rule_error(bound, ctx, "unsupported", f"{node.name} holds one value per token from before the "
                             f"merge and is read after it (by {user.name}); the merge cannot make it follow",
                             "merge after another block")


def _restore(g: fx.Graph, unpack: fx.Node, dest: fx.Node) -> None:
    """unpack(x) → unpack(x[dest]): every position takes the value of the token it merged into.
    With several merges the gathers nest, the latest innermost."""
    inner = innermost_restore(unpack)
    x = inner.args[0]
    seq_dim = unpack.args[6]
    with g.inserting_before(inner):
        gather = g.call_function(aten.index_select.default, (x, seq_dim, dest))
    gather.meta["val"] = x.meta["val"]
    if "nn_module_stack" in unpack.meta:  # where its unpack is: in the block of a padded-layout reader
        gather.meta["nn_module_stack"] = unpack.meta["nn_module_stack"]
    gather.meta[RESTORE] = True
    gather.meta[PACKED] = x.meta.get(PACKED)
    inner.args = (gather, *inner.args[1:])


def innermost_restore(unpack: fx.Node) -> fx.Node:
    """The last node of an output's chain of restoring gathers (the unpack itself without one):
    its first argument is the packed value as the graph computed it."""
    inner = unpack
    while isinstance(inner.args[0], fx.Node) and inner.args[0].meta.get(RESTORE):
        inner = inner.args[0]
    return inner


def _logical_meta(merge, outs, n_new, h, bi) -> None:
    """Logical values (the padded layout's shapes), as every packed node keeps."""
    x2, sizes2, bi2, si2, dest = outs
    merge.meta["val"] = (h.meta["val"], bi.meta["val"].float(), bi.meta["val"], bi.meta["val"], bi.meta["val"])
    for node, val in zip(outs, merge.meta["val"]):
        node.meta["val"] = val
    n_new.meta["val"] = bi.meta["val"].shape[0]


def token_counts(graph: ModelGraph, probe: dict, merges: list[fx.Node]) -> dict:
    """{"tokens": ["in→out" per op in `merges`]} on one calibration batch."""
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
