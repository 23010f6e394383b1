"""`tokens after <blocks> prune|merge`: the rule's action picks the pass (merge.py, prune.py).
`IMPLEMENTED` is what `pipeline.is_implemented` reads for compile and `slimfx plan`."""
from __future__ import annotations

from ...dsl import ast as A
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from . import merge, prune

__all__ = ["run", "IMPLEMENTED", "missing"]

IMPLEMENTED = {"merge": merge.run, "prune": prune.run}


def missing(rule: A.Tokens) -> str | None:
    """What of this rule this version cannot do (e.g. "prune score=attention"), or None."""
    if rule.action not in IMPLEMENTED:
        return rule.action
    return None


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Tokens = bound.rule
    return IMPLEMENTED[rule.action](graph, bound, ctx)
