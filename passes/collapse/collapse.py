"""`collapse <blocks> [auto(…)] method=laco`: LaCo's Reserving-Differences-while-Seeking-Common
(RDSC) layer merge, θ*_l = θ_l + Σ_k (θ_{l+k} − θ_l), then the merged blocks leave the graph.

Explicit (`collapse blocks[a:b]` merges blocks a+1..b−1 into block a), or `auto(…)`: LaCo's search
from the top block down (search.py), every trial listed in the report with its similarity."""
from __future__ import annotations

from ...dsl import ast as A
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..block_rules import collapse_range_problem, merge_problem
from ..context import Context
from ..graph import ModelGraph
from .apply import (Before, auto_count, before_rule, block_report, candidates, current, need_calibration,
                    remove_runs, rule_error, block_record)
from .cut import laco_merge
from .search import laco_trials
from .streams import collect

__all__ = ["run"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Collapse = bound.rule
    before = before_rule(graph, ctx)
    if rule.auto is None:
        return _explicit(graph, bound, ctx, before)
    return _auto(graph, bound, ctx, before)


def _explicit(graph, bound, ctx, before: Before) -> RuleReport:
    blocks = current(graph, bound.blocks)
    problem = collapse_range_problem(blocks)  # bind checks both too: `plan` refuses what compile would
    if problem is not None:
        raise rule_error(bound, ctx, "selector", *problem)
    keep, merged = blocks[0], blocks[1:]
    unlike = merge_problem(graph, keep, merged)
    if unlike is not None:
        raise rule_error(bound, ctx, "unsupported", *unlike)
    record = block_record(graph, ctx, keep.index, ends={merged[-1].path})  # before the merge changes `keep`'s output
    changed = laco_merge(graph, keep, merged)
    remove_runs(graph, [merged], bound, ctx, record)
    return block_report(graph, bound, before, {"into": keep.path, "tensors_merged": changed},
                        [f"merged into {keep.path} ({changed} tensors)"], ctx)


def _auto(graph, bound, ctx, before: Before) -> RuleReport:
    auto, n_before = bound.rule.auto, len(before.paths)
    need_calibration(bound, ctx, "with auto(…) compares merged models on calibration tokens")
    count = auto_count(bound, ctx, candidates(graph, bound), n_before)
    # Not `candidates`, which leaves out blocks that cannot be removed: a block that begins with an
    # earlier heal's map may still be merged into (the trial checks each block it would remove).
    allowed = {b.path for b in current(graph, bound.blocks)} - set(bound.protected)
    protected = {b.path for b in graph.blocks if b.path not in allowed}
    # Every stream of the model before the search: the last is LaCo's reference; `record` says
    # what `heal` maps a merged block's output back to (the output of the run's last block).
    streams = collect(graph, list(range(n_before + 1)), ctx.calib, ctx.progress, "recording the residual stream")
    record = block_record(graph, ctx, 0, streams)

    def accept(keep, merged):
        remove_runs(graph, [merged], bound, ctx, record)

    trials = laco_trials(graph, ctx.calib, streams[n_before], count=count, span=auto.get("span"),
                         interval=auto.get("interval"), threshold=auto.get("threshold"), protected=protected,
                         accept=accept, progress=ctx.progress)
    notes = ["LaCo trials: " + "; ".join(f"{t.into} +{len(t.merged)} cos {t.similarity:.4f} "
                                          f"{'kept' if t.accepted else 'rejected'}" for t in trials)
             if trials else "no LaCo trial could run: no run of blocks within the ones this rule may merge "
                            "(its selector, less `keep`, less blocks that cannot be merged or removed) is left"]
    removed = n_before - len(graph.blocks)
    if removed < count:
        notes.append(f"stopped at {removed} of {count} blocks: no further merge kept cos ≥ "
                     f"{auto.get('threshold')} (lower the threshold to remove more)")
    details = {"trials": [t.__dict__ for t in trials], "asked": count}
    return block_report(graph, bound, before, details, notes, ctx)
