"""`restore=false`: the model returns the shorter sequences a merge or prune leaves.

Every graph output that carried the sequence (unpacked to the padded layout, with each position
restored through the `dest` maps) becomes `slimfx::repad_tokens` of the final packed tokens
instead: [B, L', …] with L' the longest remaining sequence, each sequence's tokens in order and
zeros after them (before them on decoders, so that the last position stays the last token and
prefill's next-token logits are `logits[:, -1]`). `slimfx::kept_tokens` adds two outputs after the
model's own — each slot's original position (−1 at padding) and the tokens it holds — which the
CompiledModel keeps from its last call (`kept_tokens`). Inside the graph nothing changes: an op
that needs the padded layout (a pooler's select) still reads the restored one, so the values it
sees are those of `restore=true`. Every token rule of a policy says the same `restore`
(dsl/check.py), so the outputs are either all the original length or all shorter.
"""
from __future__ import annotations

import operator

from torch import fx
from torch.utils import _pytree as pytree

from ...runtime import token_ops
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from .reindex import RESTORE, TOKEN_OPS, descendants, innermost_restore
from .unpad import rule_error

__all__ = ["shorten_outputs"]

def shorten_outputs(graph: ModelGraph, bound: BoundRule, ctx: Context, right: bool) -> int:
    """Make the outputs the shorter sequences (module doc); returns how many outputs changed (0
    when none carries the sequence: a classifier's logits are the same either way)."""
    g = graph.module.graph
    last = [n for n in g.nodes if n.target in TOKEN_OPS][-1]
    items = {u.args[1]: u for u in last.users if u.target is operator.getitem}
    sizes, bi, si = items[1], items[2], items[3]
    out = next(n for n in g.nodes if n.op == "output")
    values = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    after_last = descendants(last)
    changed = 0
    for i, value in enumerate(values):
        if not (isinstance(value, fx.Node) and value.target is token_ops.unpack_tokens):
            continue
        x, batch, bdim, sdim = innermost_restore(value).args[0], value.args[3], value.args[5], value.args[6]
        if x not in after_last:
            raise rule_error(bound, ctx, "unsupported", f"`restore=false`: output {value.name} is computed before the "
                             f"last `tokens after` step ({x.name}: a hidden state output_hidden_states=True returns), "
                             "on more tokens than remain; its shorter form is not defined",
                             "use `restore=true`, or capture with output_hidden_states=False")
        if bdim < 0:
            raise rule_error(bound, ctx, "unsupported", f"`restore=false`: output {value.name} flattens batch and "
                             "sequence into one dim; its shorter form is not defined", "use `restore=true`")
        with g.inserting_before(out):
            repad = g.call_function(token_ops.repad_tokens, (x, bi, batch, bdim, sdim, right))
        repad.meta["val"] = value.meta["val"]  # logical: the padded layout's shape, as packed nodes keep
        values[i] = repad
        changed += 1
    if changed and not any(n.target is token_ops.kept_tokens for n in g.nodes):
        with g.inserting_before(out):
            kept = g.call_function(token_ops.kept_tokens, (bi, si, sizes, batch, right))
            positions = g.call_function(operator.getitem, (kept, 0))
            counts = g.call_function(operator.getitem, (kept, 1))
        kept.meta["val"] = (bi.meta["val"], bi.meta["val"].float())
        positions.meta["val"], counts.meta["val"] = kept.meta["val"]
        values += [positions, counts]
    out.args = (tuple(values),)
    _flat_outputs(g, len(values))
    _drop_unused(g)
    return changed


def _flat_outputs(g: fx.Graph, count: int) -> None:
    """A captured graph returns a flat tuple through its pytree codegen; it gains two items."""
    info = getattr(g._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        g._codegen.pytree_info = info._replace(out_spec=pytree.tree_structure(tuple(range(count))))


def _drop_unused(g: fx.Graph) -> None:
    """The unpacks (and their restoring gathers) only the outputs read before."""
    for node in reversed(list(g.nodes)):
        if not node.users and (node.target is token_ops.unpack_tokens or node.meta.get(RESTORE)):
            g.erase_node(node)
