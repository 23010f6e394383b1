"""`tokens after <blocks> prune|merge`: the rule's action picks the pass (merge.py, prune.py)."""
from __future__ import annotations

from ...dsl import ast as A
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from . import merge, prune
from .unpad import refuse_tokens_again

__all__ = ["run", "IMPLEMENTED"]

IMPLEMENTED = {"merge": merge.run, "prune": prune.run}


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Tokens = bound.rule
    refuse_tokens_again(graph, bound, ctx)
    return IMPLEMENTED[rule.action](graph, bound, ctx)
