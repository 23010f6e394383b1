"""The run shared by `merge` and `prune`: checks, the op after each selected block, the report."""
from __future__ import annotations

from ...runtime import token_ops
from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..graph_sizes import graph_bytes, graph_params
from ..calibrate import FORWARD_REPEATS, forward_ms
from ..context import Context
from ..graph import ModelGraph
from .reindex import insert_after, selected_blocks, token_counts
from ..causal import is_causal
from .flops import attention_lengths, block_flops
from .shorten import shorten_outputs
from .unpad import flops_note, pack_from, probe_batch
from ...runtime.forward_parts import recompile

__all__ = ["apply_token_op"]


def apply_token_op(graph: ModelGraph, bound: BoundRule, ctx: Context, op, params: tuple, what: str,
                   proportional: bool = False, per_token=None) -> RuleReport:
    """Insert `op` after each selected block (reindex.insert_after). Without `tokens unpad` before
    it, the tokens are packed from the first selected block's input on: sequences leave a merge or
    prune with different lengths, which the padded grid cannot hold without re-padding."""
    blocks = selected_blocks(graph, bound, ctx)
    restore = bool(bound.rule.get("restore"))
    probe = probe_batch(graph, ctx)
    before = forward_ms(graph, probe) if probe else None
    lengths = attention_lengths(graph, probe) if probe else None
    flops_before = block_flops(graph, lengths) if lengths else None
    notes = []
    if not any(n.target is token_ops.token_index for n in graph.module.graph.nodes):
        packed = pack_from(graph, graph.blocks[blocks[0].index].input, bound, ctx)
        notes.append(f"no `tokens unpad` above: tokens are packed from {blocks[0].path}'s input on "
                     f"(attention per sequence in {packed.attention} places)")
    inserted = []
    for block in blocks:
        graph.reindex()
        inserted.append(insert_after(graph, graph.blocks[block.index], op, params, bound, ctx,
                                     proportional, per_token))
    if not restore:
        changed = shorten_outputs(graph, bound, ctx, right=is_causal(graph))
        notes.append(f"restore=false: {changed} output{'s' if changed != 1 else ''} return{'' if changed != 1 else 's'} the remaining tokens "
                     "(CompiledModel.kept_tokens: their positions and sizes)" if changed else
                     "restore=false changes nothing here: no output carries the sequence")
    graph.module.graph.lint()
    recompile(graph.module)
    paths = [b.path for b in blocks]
    details = {"blocks": paths}
    notes.insert(0, f"{what} after {', '.join(paths)}")
    if probe:
        details.update(token_counts(graph, probe, inserted))
        # one rounding for details and note (the collapse report's note once disagreed with its details)
        before, after = round(before, 2), round(forward_ms(graph, probe), 2)
        details.update(latency_ms_before=before, latency_ms_after=after)
        # ×after/before like every report row (a slowdown reads ×>1)
        notes.append(f"first calibration batch: tokens {' then '.join(details['tokens'])}; one forward "
                     f"{before:.1f} → {after:.1f} ms (×{after / before:.2f}, best of {FORWARD_REPEATS})")
        if flops_before:
            notes.append(flops_note(details, flops_before, graph, probe))
    params_now, nbytes = graph_params(graph), graph_bytes(graph)
    return RuleReport(bound.line, bound.text, "tokens", tuple(paths), params_now, params_now, nbytes, nbytes,
                      details, tuple(notes))
