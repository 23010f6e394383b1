"""The pipeline: run a Plan's rules in file order, one registered pass per rule kind.

A pass registers itself with `@register(A.Quantize)` and has the shape
`run(graph, bound: BoundRule, ctx: Context) -> RuleReport`. After every pass the graph is linted.
A rule whose pass is not registered stops compile() with a SpecError: nothing is ever skipped
silently (`slimfx plan` lists such rules as "not implemented").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..dsl import ast as A
from ..dsl.errors import Diagnostic, SpecError
from ..runtime.report import Report, RuleReport
from .bind import BoundRule, Plan, graph_bytes, graph_params
from .graph import ModelGraph

__all__ = ["Context", "register", "is_implemented", "run_pipeline", "PassFn"]


@dataclass
class Context:
    """What every pass may read: calibration batches, the policy source for errors, progress."""

    calib: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    filename: str = "<policy>"
    progress: bool = False
    dump_dir: str | None = None  # when set, the graph is written here after each stage


PassFn = Callable[[ModelGraph, BoundRule, Context], RuleReport]
_PASSES: dict[type, PassFn] = {}


def register(rule_type: type) -> Callable[[PassFn], PassFn]:
    """Decorator: the pass that applies rules of `rule_type`."""

    def deco(fn: PassFn) -> PassFn:
        _PASSES[rule_type] = fn
        return fn

    return deco


def is_implemented(rule: A.Rule) -> bool:
    """`keep` is applied by bind(); everything else needs a registered pass."""
    return isinstance(rule, A.Keep) or type(rule) in _PASSES


def run_pipeline(graph: ModelGraph, plan: Plan, ctx: Context) -> Report:
    """Apply every rule of `plan` to `graph` in order; return the report."""
    _refuse_unimplemented(plan, ctx)
    start = time.perf_counter()
    rules = []
    for i, bound in enumerate(plan.rules):
        if isinstance(bound.rule, A.Keep):
            rules.append(_keep_report(bound))
            continue
        report = _PASSES[type(bound.rule)](graph, bound, ctx)
        graph.reindex()
        graph.lint()
        _dump(graph, ctx, i, bound)
        rules.append(report)
    return Report(plan.policy.name if plan.policy else None, plan.model_class, tuple(rules),
                  plan.params_total, graph_params(graph), plan.bytes_total, graph_bytes(graph),
                  time.perf_counter() - start)


def _refuse_unimplemented(plan: Plan, ctx: Context) -> None:
    missing = [b for b in plan.rules if not is_implemented(b.rule)]
    if missing:
        raise SpecError([Diagnostic("unsupported", f"`{b.rule.kind}` is not implemented in this version of "
                                    "slimfx, so this policy cannot be compiled yet", b.line, b.rule.span.column,
                                    len(b.rule.kind), "`slimfx plan` lists what each rule would do; remove the "
                                    "rule to compile the rest") for b in missing], ctx.source, ctx.filename)


def _keep_report(bound: BoundRule) -> RuleReport:
    e = bound.estimate
    return RuleReport(bound.line, bound.text, "keep", tuple(t.path for t in bound.targets),
                      e.params_before, e.params_after, e.bytes_before, e.bytes_after,
                      notes=(f"{len(bound.targets)} targets protected from every other rule",))


def _dump(graph: ModelGraph, ctx: Context, i: int, bound: BoundRule) -> None:
    if ctx.dump_dir:
        from pathlib import Path

        out = Path(ctx.dump_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{i:02d}-{bound.rule.kind}.txt").write_text(f"# {bound.text}\n{graph.module.code}")
