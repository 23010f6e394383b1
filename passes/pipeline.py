"""The pipeline: run a Plan's rules in file order, each by the pass its rule kind names in
`PASSES`. Every pass has the same shape, `run(graph, bound: BoundRule, ctx: Context) -> RuleReport`;
after each one the graph is re-indexed and linted. A rule kind with no pass stops compile() with
a SpecError: nothing is ever skipped silently (`slimfx plan` lists such rules as "not implemented").
"""
from __future__ import annotations

import time
from typing import Callable

from ..dsl import ast as A
from ..dsl.errors import Diagnostic, SpecError
from ..runtime.report import Report, RuleReport
from .bind import BoundRule, Plan, rebind
from .graph_sizes import graph_bytes, graph_params
from .context import Context
from .graph import ModelGraph
from .lowrank import ErrorPlan
from .adapters import adapt
from .collapse import collapse, drop, heal
from .precision import choose, quantize
from .tokens import after, unpad

__all__ = ["Context", "PASSES", "is_implemented", "run_pipeline", "PassFn"]

PassFn = Callable[[ModelGraph, BoundRule, Context], RuleReport]

# Rule kind -> the pass that applies it. `keep` has none: bind() applies it by taking its targets
# away from every other rule.
PASSES: dict[type, PassFn] = {
    A.Collapse: collapse.run,    # passes/collapse/collapse.py
    A.Drop: drop.run,            # passes/collapse/drop.py
    A.Heal: heal.run,            # passes/collapse/heal.py
    A.Adapt: adapt.run,          # passes/adapters/adapt.py
    A.Quantize: quantize.run,    # passes/precision/quantize.py
    A.Precision: choose.run,     # passes/precision/choose.py
    A.Unpad: unpad.run,          # passes/tokens/unpad.py
    A.Tokens: after.run,         # passes/tokens/after.py (merge.py, prune.py)
}


def is_implemented(rule: A.Rule) -> bool:
    """Whether a pass applies this rule (every rule of the grammar has one in this version; a rule
    the grammar gains before its pass is refused by name, and `slimfx plan` marks it)."""
    return isinstance(rule, A.Keep) or type(rule) in PASSES


def run_pipeline(graph: ModelGraph, plan: Plan, ctx: Context) -> Report:
    """Apply every rule of `plan` to `graph` in order; return the report."""
    _refuse_unimplemented(plan, ctx)
    start = time.perf_counter()
    rules = []
    for i in range(len(plan.rules)):
        bound = plan.rules[i]
        if isinstance(bound.rule, A.Keep):
            rules.append(_keep_report(bound))
            continue
        ctx.keep_originals = _error_init_targets(plan.rules[i + 1:])
        ctx.error_plans = _error_plans(plan.rules[i + 1:])
        ctx.removals_follow = _removals_follow(plan.rules[i + 1:])
        ctx.heal_follows = any(isinstance(b.rule, A.Heal) for b in plan.rules[i + 1:])
        report = PASSES[type(bound.rule)](graph, bound, ctx)
        graph.reindex()
        graph.lint()
        _dump(graph, ctx, i, bound)
        rules.append(report)
        if getattr(bound.rule, "auto", None) is not None and i + 1 < len(plan.rules):
            # The search chose its blocks: the rules after it bind to the model as it is now.
            plan = rebind(graph, plan, i + 1, source=ctx.source, filename=ctx.filename)
    return Report(plan.policy.name if plan.policy else None, plan.model_class, tuple(rules),
                  plan.params_total, graph_params(graph), plan.bytes_total, graph_bytes(graph),
                  time.perf_counter() - start, ctx.calib.described() if ctx.calib.read and ctx.calib else "")


def _error_init_targets(later: tuple[BoundRule, ...]) -> frozenset[str]:
    """Paths whose pre-quantization weights a later `adapt … init=error` reads."""
    return frozenset(t.path for b in later if isinstance(b.rule, A.Adapt) and b.rule.get("init") == "error"
                     for t in b.targets)


def _removals_follow(later: tuple[BoundRule, ...]) -> bool:
    """A `collapse`/`drop` among the later rules, before the next `heal`."""
    for b in later:
        if isinstance(b.rule, A.Heal):
            return False
        if isinstance(b.rule, A.BLOCK_RULES):
            return True
    return False


def _error_plans(later: tuple[BoundRule, ...]) -> dict[str, ErrorPlan]:
    """path -> what the next rule fits, when it is an `adapt … init=error` (keep rules aside): a
    rule between could change the weights it starts from, so then the adapt rule fits them itself."""
    nxt = next((b for b in later if not isinstance(b.rule, A.Keep)), None)
    if nxt is None or not isinstance(nxt.rule, A.Adapt) or nxt.rule.get("init") != "error":
        return {}
    r = nxt.rule
    plan = ErrorPlan(r.get("rank"), r.get("alpha"), r.get("dtype"), nxt.line)
    return {t.path: plan for t in nxt.targets}


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
                      notes=(f"{len(bound.targets)} target{'s' * (len(bound.targets) != 1)} protected from every other rule",))


def _dump(graph: ModelGraph, ctx: Context, i: int, bound: BoundRule) -> None:
    if ctx.dump_dir:
        from pathlib import Path

        out = Path(ctx.dump_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{i:02d}-{bound.rule.kind}.txt").write_text(f"# {bound.text}\n{graph.module.code}")
