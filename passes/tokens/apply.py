"""The run shared by `merge` and `prune`: checks, the op after each selected block, the report."""
from __future__ import annotations

from ...runtime.report import RuleReport
from ..bind import BoundRule, graph_bytes, graph_params
from ..calibrate import forward_ms
from ..context import Context
from ..graph import ModelGraph
from .reindex import index_node, insert_after, selected_blocks, token_counts
from .flops import block_flops, packed_lengths
from .unpad import flops_note, padded_batch

__all__ = ["apply_token_op", "is_decoder"]


def is_decoder(graph: ModelGraph) -> bool:
    """A causal LM: Hugging Face's generating models all derive from GenerationMixin."""
    return "GenerationMixin" in graph.modules[""].classes


def apply_token_op(graph: ModelGraph, bound: BoundRule, ctx: Context, op, params: tuple, what: str,
                   proportional: bool = False) -> RuleReport:
    index = index_node(graph, bound, ctx)
    blocks = selected_blocks(graph, bound, ctx)
    probe = padded_batch(ctx)
    before = forward_ms(graph, probe) if probe else None
    lengths = packed_lengths(graph, probe) if probe else None
    flops_before = block_flops(graph, lengths) if lengths else None
    inserted = []
    for block in blocks:
        graph.reindex()
        inserted.append(insert_after(graph, graph.blocks[block.index].output, index, op, params, bound, ctx,
                                     proportional))
    graph.module.graph.lint()
    graph.module.recompile()
    paths = [b.path for b in blocks]
    details = {"blocks": paths}
    notes = [f"{what} after {', '.join(paths)}"]
    if probe:
        details.update(token_counts(graph, probe, inserted))
        after = forward_ms(graph, probe)
        details.update(latency_ms_before=round(before, 2), latency_ms_after=round(after, 2))
        notes.append(f"first calibration batch: real tokens {' then '.join(details['tokens'])}; one forward "
                     f"{before:.1f} → {after:.1f} ms (×{before / after:.2f})")
        if flops_before:
            notes.append(flops_note(details, flops_before, graph, probe))
    params_now, nbytes = graph_params(graph), graph_bytes(graph)
    return RuleReport(bound.line, bound.text, "tokens", tuple(paths), params_now, params_now, nbytes, nbytes,
                      details, tuple(notes))
