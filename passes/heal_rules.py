"""What a `heal … fold=true` can do at a cut: checks bind (so that `plan` refuses what compile
would) and the heal pass share. Core, as block_rules.py is."""
from __future__ import annotations

import torch
from torch import fx

from .graph import Block, ModelGraph
from .rewrite import find_sites

__all__ = ["FOLD_HINT", "fold_block_problem", "fold_sum_problem", "residual_sum", "through"]

aten = torch.ops.aten
FOLD_HINT = "write fold=false (a map on the stream)"
# Ops that only view a tensor: GPT-2's Conv1D gives [B·S, D] rows viewed back to [B, S, D], and
# OPT's block returns its residual sum viewed so; their size operands are not tensors.
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def fold_block_problem(graph: ModelGraph, before: Block | None) -> tuple[str, str] | None:
    """(message, hint) when the block before a cut (None: the gap starts at the first block) has
    no single down projection to fold into; else None."""
    downs = graph.by_role("mlp.down", before.index) if before is not None else []
    if before is None or len(downs) != 1:
        where = "the gap starts at the first block" if before is None else f"{before.path} has no single mlp.down"
        return (f"`heal … fold=true` folds into the down projection of the block before each cut, and {where}",
                FOLD_HINT)
    return None


def fold_sum_problem(graph: ModelGraph, before: Block, stream: fx.Node) -> tuple[str, str] | None:
    """(message, hint) when `stream`, what leaves `before`, is not the residual sum h + down(…) of
    its down projection (a post-norm block: the map would not reach the stream); else None."""
    site = find_sites(graph, graph.by_role("mlp.down", before.index)[0])[0]
    out = residual_sum(stream)
    if out.target is not aten.add.Tensor or not any(through(a, site.node) for a in out.args):
        return (f"`heal … fold=true` needs {before.path}'s output to be the residual sum h + down(…) (a pre-norm "
                "block); this model's is not", FOLD_HINT)
    return None


def residual_sum(out: fx.Node) -> fx.Node:
    """The block output `out` without the views around it."""
    while out.op == "call_function" and out.target in _VIEWS:
        out = out.args[0]
    return out


def through(arg, node: fx.Node) -> bool:
    """Is `arg` `node`, or reached from it through one-tensor-input ops (dropout, casts, clones,
    views)?"""
    while isinstance(arg, fx.Node):
        if arg is node:
            return True
        inputs = [n for n in arg.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        if arg.op != "call_function" or len(inputs) != 1:
            return False
        arg = inputs[0]
    return False
