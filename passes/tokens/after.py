"""`tokens after <blocks> prune|merge`: the rule's action picks the pass. Merge is implemented
(passes/tokens/merge.py); prune is not yet, and `is_implemented` says so to compile and `plan`."""
from __future__ import annotations

from ...dsl import ast as A
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from . import merge

__all__ = ["run", "IMPLEMENTED"]

IMPLEMENTED = {"merge": merge.run}


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Tokens = bound.rule
    return IMPLEMENTED[rule.action](graph, bound, ctx)
