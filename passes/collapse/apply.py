"""What `collapse` and `drop` share: how many blocks an `auto(…)` asks for, removing the chosen
runs (recording a Cut for `heal` with what each run output on the calibration tokens), and the
report row."""
from __future__ import annotations

from dataclasses import dataclass


from ...runtime.inputs import complete_inputs
from ...runtime.report import RuleReport
from ...runtime.token_ids import token_ids_name
from ..bind import BoundRule
from ..graph_sizes import graph_bytes, graph_params
from ..block_rules import auto_count as rules_auto_count
from ..calibrate import CALIB_HINT, FORWARD_REPEATS, NO_CALIB, forward_ms
from ..context import Context, rule_error
from ..graph import Block, ModelGraph
from ..block_reads import removal_problem, step_left_last
from .cut import Cut, remove_run
from .streams import collect

__all__ = ["auto_count", "candidates", "remove_runs", "block_report", "current", "rule_error", "need_calibration",
           "block_record", "latency_ms", "Before", "before_rule"]

PROBE_TOKENS = 256  # the report's latency: one forward of 1×256 tokens


def need_calibration(bound: BoundRule, ctx: Context, why: str) -> None:
    if not ctx.calib:
        raise rule_error(bound, ctx, "missing-value", f"`{bound.rule.kind}` {why}, and {NO_CALIB}", CALIB_HINT)


def current(graph: ModelGraph, blocks) -> list[Block]:
    """The bound blocks as the graph indexes them now (earlier rules renumbered them)."""
    by_path = {b.path: b for b in graph.blocks}
    return [by_path[b.path] for b in blocks if b.path in by_path]


def candidates(graph: ModelGraph, bound: BoundRule) -> list[int]:
    """Indices of the blocks an auto search may remove: the selected ones not protected by `keep`."""
    protected = set(bound.protected)
    return [b.index for b in current(graph, bound.blocks) if b.path not in protected and removal_problem([b]) is None]


def auto_count(bound: BoundRule, ctx: Context, pool: list[int], n_blocks: int) -> int:
    """Blocks to remove (block_rules.auto_count), refused at the rule when the candidates (block
    indices) cannot give that many: bind checks it too, on the model as `plan` sees it."""
    count, problem = rules_auto_count(bound.rule, pool, n_blocks)
    if problem is not None:
        raise rule_error(bound, ctx, "out-of-range", *problem)
    return count


def block_record(graph: ModelGraph, ctx: Context, first: int, streams: dict[int, list] | None = None,
                 ends: set[str] | None = None) -> dict[str, list]:
    """What each block from index `first` on output, by path (rows per calibration batch), in the
    model as the policy's first collapse/drop found it: a heal maps each gap to what left it in
    that model, however many rules made the gap (`drop blocks[3]` twice was fitted to the model
    already without block 3: KL 0.0068 against 0.0032 for `drop blocks[3:5]`). Read before this
    rule changes anything: a block after an earlier cut takes the earlier rules' record (it
    outputs something else now), any other reads the graph now (nothing before it changed).
    `streams`: the graph's streams if the caller has them already. `ends`: the paths of the
    runs' last blocks, all that is kept when no collapse/drop follows before a heal (every block
    after the first change, kept for a later rule, is 18 streams of SmolLM2 for a cut at 12: 1.2
    GB at 25k calibration tokens). Empty without calibration, or without a heal after the rule."""
    if not ctx.calib or not ctx.heal_follows:
        return {}
    blocks = graph.blocks[first:]
    if ends is not None and not ctx.removals_follow:
        blocks = [b for b in blocks if b.path in ends]
    if streams is None:
        streams = collect(graph, [b.index + 1 for b in blocks], ctx.calib, ctx.progress,
                          "recording what the removed blocks output")
    earlier = {path: rows for cut in ctx.cuts for path, rows in cut.record.items()}
    record = {}
    for block in blocks:
        now, then = streams[block.index + 1], earlier.get(block.path)
        # A rule between (a `tokens after` merge) may have changed the rows: then what it sees now.
        record[block.path] = then if then is not None and _same_rows(then, now) else now
    return record


def _same_rows(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))


def remove_runs(graph: ModelGraph, runs: list[list[Block]], bound: BoundRule, ctx: Context,
                record: dict[str, list] | None = None) -> list[Cut]:
    """Remove each run (given in model order; removed last to first so indices stay valid) and
    record a Cut per run for `heal`, its target the run's last block's output in `record`
    (block_record, read before the rule changed anything) or, if None, read now."""
    removed = [b for run in runs for b in run]
    problem = removal_problem(removed) or step_left_last(graph.blocks, removed)
    if problem is not None:  # bind refuses explicit selections already; this guards what a search chose
        raise rule_error(bound, ctx, "unsupported", *problem)
    if record is None:
        record = block_record(graph, ctx, min(run[0].index for run in runs), ends={run[-1].path for run in runs})
    targets = [record.get(run[-1].path, []) for run in runs]
    cuts = []
    for run, target in sorted(zip(runs, targets), key=lambda r: -r[0][0].index):
        end = run[-1].index + 1
        before = graph.blocks[run[0].index - 1].path if run[0].index > 0 else None
        after = graph.blocks[end].path if end < len(graph.blocks) else None
        stream = remove_run(graph, run)
        removed, kept = tuple(b.path for b in run), dict(record)
        # An earlier cut right beside this run (its next or previous block removed now), or inside
        # it (both), is one gap with it: what enters the gap is this stream, what left it is the
        # later end's target, and its blocks are listed in model order.
        for old in [c for c in ctx.cuts if c.after in removed or c.before in removed]:
            ctx.cuts.remove(old)
            kept = {**old.record, **kept}  # the blocks before this rule's first change keep theirs
            if old.before in removed and old.after in removed:  # this run spans the earlier gap
                i = removed.index(old.before) + 1
                removed = removed[:i] + old.removed + removed[i:]
            elif old.after in removed:  # the earlier gap ends where this run starts
                removed, before = old.removed + removed, old.before
            else:  # it starts where this run ends
                removed, after, target = removed + old.removed, old.after, old.target
        cuts.append(Cut(bound.line, removed, stream, before, after, target, kept))
    cuts.reverse()
    ctx.cuts.extend(cuts)
    # In model order across rules too: heal fits each cut on the stream with the earlier maps
    # applied (`drop blocks[4]` then `drop blocks[1]` fitted the later cut first, 0.35 off).
    ctx.cuts.sort(key=lambda c: graph.node_order[c.stream])
    return cuts


def latency_ms(graph: ModelGraph, ctx: Context, repeats: int = FORWARD_REPEATS) -> tuple[float, int | None] | None:
    """(least ms of one forward of `repeats`, tokens) of the graph on 1×256 tokens taken from the first
    calibration batch (repeated to length), or on its first row where the model takes fewer
    positions; where no such probe can be built (no token ids: a ViT; another input beside them
    that the probe cannot make) on the first calibration row as it is, tokens None; None without
    calibration. For the report's before → after."""
    if not ctx.calib:
        return None
    batch = ctx.calib.unread()[0]  # a measurement, not calibration
    name = token_ids_name(graph)  # `tokens` too: it was measured on the batch as it was, "0 tokens"
    if name in batch:
        ids = batch[name].reshape(-1)
        for tokens in (PROBE_TOKENS, batch[name].shape[-1]):
            probe = ids.repeat(tokens // ids.numel() + 1)[:tokens][None]
            inputs = complete_inputs({name: probe}, graph.inputs)
            inputs = {k: v for k, v in inputs.items() if k in {i.name for i in graph.inputs}}
            try:
                return forward_ms(graph, inputs, repeats), tokens
            except Exception:  # noqa: BLE001 - a model with fewer positions (the graph's guard says so)
                continue
    # the row as calibration gave it: a ViT's report said "a 1×0 forward", and a model with an
    # input beside its ids that the probe lacks had no latency at all
    try:
        return forward_ms(graph, {k: v[:1] for k, v in batch.items()}, repeats), None
    except Exception:  # noqa: BLE001 - a batch whose inputs are not all batched: no figure, not a failure
        return None


@dataclass(frozen=True)
class Before:
    """The model as a collapse/drop rule found it, for its report."""

    params: int
    nbytes: int
    paths: list[str]  # block paths
    latency: tuple[float, int] | None  # (ms, tokens) of one forward


def before_rule(graph: ModelGraph, ctx: Context) -> Before:
    return Before(graph_params(graph), graph_bytes(graph), [b.path for b in graph.blocks], latency_ms(graph, ctx))


def block_report(graph: ModelGraph, bound: BoundRule, before: Before, details: dict, notes: list[str],
                 ctx: Context) -> RuleReport:
    """The rule's row: blocks removed (those of `before.paths` no longer in the graph), params and
    bytes of the whole model before → after, latency before → after."""
    params, nbytes, ms_before = before.params, before.nbytes, before.latency
    now = {b.path for b in graph.blocks}
    removed = [p for p in before.paths if p not in now]
    n_before = len(before.paths)
    said = f"{len(removed)} of {n_before} blocks removed" + (f": {_short(removed)}" if removed else "")
    notes = [said, *notes, *bound.warnings]
    after = latency_ms(graph, ctx) if ms_before is not None else None
    if after is not None:
        # the note is formatted from the stored, rounded figures: formatting the raw ones rounded
        # twice, and the note said "11.0 → 5.7 ms" where the details held 10.95 → 5.75
        (was, tokens), (now, _) = ms_before, after
        was, now = round(was, 2), round(now, 2)
        details = {**details, "latency_ms": [was, now], "latency_tokens": tokens}
        what = f"a 1×{tokens} forward" if tokens is not None else "a forward of the first calibration row"
        notes.append(f"CPU latency of {what} ×{now / was:.2f} ({_ms(was)} → {_ms(now)} ms, best of {FORWARD_REPEATS})")
    return RuleReport(bound.line, bound.text, bound.rule.kind, tuple(removed), params, graph_params(graph),
                      nbytes, graph_bytes(graph), {"removed": list(removed), "blocks_before": n_before,
                                                   "blocks_after": len(graph.blocks), **details}, tuple(notes))


def _short(paths: list[str]) -> str:
    """"model.layers.{3,7,20}" for paths under one parent."""
    parents = {p.rpartition(".")[0] for p in paths}
    if len(parents) == 1:
        return f"{parents.pop()}.{{{','.join(p.rpartition('.')[2] for p in paths)}}}"
    return ", ".join(paths)


def _ms(ms: float) -> str:
    """Whole ms from 100 on, tenths below: a tiny model's "×0.57 (4 → 2 ms)" disagreed with itself."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"
