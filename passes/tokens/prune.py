"""`tokens after <blocks> prune keep=K score=norm protect=cls|none restore=true`: keep the top K of
each sequence's tokens after each selected block.

`slimfx::token_prune` ranks a sequence's tokens by the norm of their hidden state and keeps the
top ⌈K·L⌉ in their order (the first token with `protect=cls`; on a causal decoder always the last
position, whose logits are the next token's). A pruned position's output is the final value of
its nearest kept token by cosine at the prune point (`restore=true`), which the measurements
behind this pass found far better than its stale state. On packed tokens of `tokens unpad`, like
merging (reindex.py). `score=attention` and `restore=false` are not implemented in this version
(after.missing: compile refuses them before any pass runs).
"""
from __future__ import annotations

from ...dsl import ast as A
from ...runtime import token_ops
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from .apply import apply_token_op, is_decoder

__all__ = ["run"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Tokens = bound.rule
    keep = float(rule.get("keep"))
    return apply_token_op(graph, bound, ctx, token_ops.token_prune,
                          (keep, rule.get("protect") == "cls", is_decoder(graph)),
                          f"prune to the {keep:.0%} of each sequence's tokens with the largest hidden-state norm")
