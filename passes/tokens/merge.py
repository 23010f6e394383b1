"""`tokens after <blocks> merge ratio=R protect=cls restore=true`: ToMe merging after each block.

After the residual stream leaves each selected block, `slimfx::token_merge` merges ⌊R·L⌋ of each
sequence's L tokens into their most similar tokens (bipartite soft matching by cosine of the
hidden states, or with `by=keys` of the block attention's keys averaged over heads, as ToMe does;
size-weighted averages, sizes tracked across merges). Merging runs on packed tokens: those of
`tokens unpad`, or packed from the first selected block on without it (apply.py); reindex.py switches every later reader of
the token index to the merge's and restores the outputs (`restore=true`: each output position
takes the final value of the token it was merged into, so mean pooling with the original mask is
size-weighted). `prop_attn=true` gives later attention the merged sizes (log size added to each
key's logits), as ToMe does. Causal decoders are refused: a merged token would see positions after its own.
"""
from __future__ import annotations

import torch
from torch import fx

from ...dsl import ast as A
from ...runtime import token_ops
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from .apply import apply_token_op
from ..causal import merge_refusal
from .unpad import rule_error

__all__ = ["run"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Tokens = bound.rule
    refusal = merge_refusal(graph)
    if refusal:
        raise rule_error(bound, ctx, "unsupported", *refusal)
    ratio = float(rule.get("ratio"))
    prop = bool(rule.get("prop_attn"))
    keys = rule.get("by") == "keys"
    return apply_token_op(graph, bound, ctx, token_ops.token_merge, (ratio, rule.get("protect") == "cls"),
                          f"ToMe merge{' with proportional attention' if prop else ''} of {ratio:.0%} of each "
                          f"sequence's tokens, matched by {'attention keys' if keys else 'hidden states'}"
                          + (_CAP if ratio >= 0.5 else ""),
                          proportional=prop, per_token=_mean_keys if keys else None)


# ToMe's bipartite matching pairs each token of one half with one of the other: a merge can take
# at most half of the tokens it may pair, fewer than `ratio` asks from 0.5 up (4 tokens with
# protect=cls became 3, not 2).
_CAP = (", at most ⌊L/2⌋ of L tokens (⌊(L−1)/2⌋ with protect=cls): the matching pairs each token once; "
        "the `tokens` figures give the counts")


def _mean_keys(g: fx.Graph, attention: fx.Node) -> fx.Node:
    """ToMe's `by=keys` metric: the block attention's keys averaged over heads, [1, N, d]."""
    k = attention.args[1]
    node = g.call_function(torch.ops.aten.mean.dim, (k, [1]))
    node.meta["val"] = k.meta["val"].mean(1)
    return node
