"""`tokens after <blocks> prune keep=K score=norm protect=cls|none restore=true`: keep the top K of
each sequence's tokens after each selected block.

`slimfx::token_prune` ranks a sequence's tokens by the norm of their hidden state (`score=norm`)
or by attention (`score=attention`: what the first token pays each token on encoders, the mean
attention each receives on decoders, recomputed from the block's own queries and keys by
`slimfx::attention_score`), and keeps the top ⌈K·L⌉ in their order (the first token with
`protect=cls`; on a causal decoder always the last position, whose logits are the next token's).
A pruned position's output is the final value of its nearest kept token by cosine at the prune
point (`restore=true`), which the measurements behind this pass found far better than its stale
state; with `restore=false` the model returns the kept tokens only (shorten.py). On packed
tokens, like merging (apply.py, reindex.py).
"""
from __future__ import annotations

from torch import fx

from ...dsl import ast as A
from ...runtime import token_ops
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from .apply import apply_token_op
from ..causal import is_causal

__all__ = ["run"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Tokens = bound.rule
    keep = float(rule.get("keep"))
    decoder = is_causal(graph)
    by_attention = rule.get("score") == "attention"
    what = ("the mean attention they receive" if decoder else "the attention the first token pays them") \
        if by_attention else "their hidden-state norm"
    return apply_token_op(graph, bound, ctx, token_ops.token_prune,
                          (keep, rule.get("protect") == "cls", decoder),
                          f"prune to the {keep:.0%} of each sequence's tokens ranked by {what}",
                          per_token=_attention_score(decoder) if by_attention else None)


def _attention_score(decoder: bool):
    """`score=attention`: slimfx::attention_score from the block attention's own queries and keys
    (only the softmax rows needed: the first token's on encoders, all on decoders), with its sizes
    when an earlier `prop_attn` merge gave it some: the score is the attention the block paid."""
    def build(g: fx.Graph, attention: fx.Node) -> fx.Node:
        q, k, _, mask, bi, si, batch, scale, causal, gqa = attention.args[:10]
        sizes = attention.args[10] if len(attention.args) > 10 else attention.kwargs.get("sizes")
        node = g.call_function(token_ops.attention_score, (q, k, mask, bi, si, batch, scale, causal, gqa, decoder,
                                                            sizes))
        node.meta["val"] = bi.meta["val"].float()
        return node
    return build
