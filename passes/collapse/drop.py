"""`drop <blocks>`: remove blocks, the residual stream rewired past each removed run.

Explicit (`drop blocks[-5:-1]`, `drop {blocks[3], blocks[7]}`), or `auto(count=N | ratio=R, …)`
over the selected blocks: `score=influence` removes the N blocks of lowest block influence
1 − cos(x_in, x_out) (ShortGPT); `score=angular` removes contiguous runs of at most `max_run`
blocks whose residual input and output are closest in angular distance (Gromov et al. 2024),
never the last block. Each removed run is a cut a later `heal` repairs."""
from __future__ import annotations

from ...dsl import ast as A
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..context import Context
from ..graph import ModelGraph
from .apply import (auto_count, before_rule, block_report, candidates, current, need_calibration, remove_runs,
                    rule_error)
from ..block_reads import auto_drop_problem, runs_of, token_step_in
from .search import NotEnoughBlocks, by_angular, by_influence
from .streams import angular, similarities

__all__ = ["run"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    rule: A.Drop = bound.rule
    before = before_rule(graph, ctx)
    n_before = len(before.paths)
    details, notes = {}, []
    if rule.auto is None:
        blocks = current(graph, bound.blocks)
        if len(blocks) >= n_before:
            raise rule_error(bound, ctx, "out-of-range", f"`drop` removes all {n_before} blocks",
                             "leave at least one block")
        runs = runs_of(blocks)
    else:
        runs, details, notes = _search(graph, bound, ctx)
    cuts = remove_runs(graph, runs, bound, ctx)
    details["runs"] = [list(c.removed) for c in cuts]
    return block_report(graph, bound, before, details, notes, ctx)


def _search(graph: ModelGraph, bound: BoundRule, ctx: Context):
    auto = bound.rule.auto
    need_calibration(bound, ctx, "with auto(…) scores blocks on calibration tokens")
    pool = candidates(graph, bound)
    n = len(graph.blocks)
    count = auto_count(bound, ctx, pool, n)
    score = auto.get("score")
    max_run = auto.get("max_run") if score == "angular" else 1
    step = token_step_in(graph)
    if step is not None:  # bind says so for a step it can see; a CompiledModel's, here too
        raise rule_error(bound, ctx, "unsupported", *auto_drop_problem(f"the model's `tokens after` step ({step})"))
    sims = similarities(graph, ctx.calib, max_run, ctx.progress)
    try:
        if score == "angular":
            chosen = by_angular(sims, count, max_run, pool, n)
        else:
            chosen = [[i] for i in by_influence(sims, count, pool)]
    except NotEnoughBlocks as e:
        raise rule_error(bound, ctx, "out-of-range", f"`drop … auto(score={score})` cannot remove {count} "
                         f"block{'s' * (count != 1)}: {e}", "lower count/ratio, or raise max_run") from None
    runs = runs_of([graph.blocks[i] for run in chosen for i in run])
    if score == "angular":
        scores = {graph.blocks[r[0]].path: round(angular(sims[r[0], r[-1] + 1]), 5) for r in chosen}
        # "model.layers.13–14: 0.0947" (it read "model.layers.13 +1: 0.0947")
        notes = ["angular distance per removed run: " + ", ".join(
            f"{p}{'–' + graph.blocks[r[-1]].path.rpartition('.')[2] if len(r) > 1 else ''}: {d:.4f}"
            for (p, d), r in zip(scores.items(), chosen))]
        return runs, {"score": score, "angular_distance": scores}, notes
    influence = {graph.blocks[i].path: round(1 - sims[i, i + 1], 6) for i in range(n)}
    notes = ["block influence of the removed: " + ", ".join(f"{graph.blocks[i].index}: "
                                                             f"{influence[graph.blocks[i].path]:.4f}" for r in chosen for i in r)]
    return runs, {"score": score, "influence": influence}, notes
