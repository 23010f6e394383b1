"""`tokens unpad`: the compiled model computes on the real tokens of a padded batch only.

From the residual stream entering the first block on, linears, norms and MLPs run on the packed
tokens of the whole batch and attention runs per sequence (passes/tokens/pack.py); the outputs
come back in the padded layout with zeros at padding positions. Exact: at real positions the
outputs equal the original's within float tolerance; each token keeps its original position
(rotary tables and position embeddings are gathered at the real positions), so left and right
padding both work. The report gives real and padded tokens of the first calibration batch and
the latency of one forward on it before → after.
"""
from __future__ import annotations


import torch

from ...runtime.report import RuleReport
from ..bind import BoundRule
from ..graph_sizes import graph_bytes, graph_params
from ..calibrate import FORWARD_REPEATS, forward_ms
from ..context import Context, rule_error
from ..graph import ModelGraph
from .layout import MASK_INPUT, Symbols
from .flops import attention_lengths, block_flops
from ..token_history import tokens_again_refusal
from ..token_attention import SDPA, unpad_mask_problem
from .pack import PackResult, pack_graph

__all__ = ["run", "refuse_tokens_again", "MASK_INPUT", "padded_batch", "probe_batch", "pack_from", "rule_error",
           "flops_note"]


def run(graph: ModelGraph, bound: BoundRule, ctx: Context) -> RuleReport:
    refuse_tokens_again(graph, bound, ctx)
    _mask_placeholder(graph, bound, ctx)
    if not graph.blocks:
        raise rule_error(bound, ctx, "unsupported", f"`tokens unpad` packs the tokens entering the first block, and "
                     f"{graph.model_class} has no repeated blocks", "remove the rule")
    probe = padded_batch(graph, ctx)
    before = forward_ms(graph, probe) if probe else None
    lengths = attention_lengths(graph, probe) if probe else None
    flops_before = block_flops(graph, lengths) if lengths else None
    result = pack_from(graph, graph.blocks[0].input, bound, ctx)
    if result.attention == 0:
        notes = ["no attention op runs per sequence (the model writes attention out by hand): "
                 "attention runs on the padded layout, only the other ops on real tokens"]
    else:
        notes = [f"attention per sequence in {result.attention} places"]
    if result.padded:
        notes.append(f"{len(result.padded)} op{'s' if len(result.padded) != 1 else ''} need{'' if len(result.padded) != 1 else 's'} the padded layout and scatter back to it first: "
                     + ", ".join(result.padded[:4]) + (" …" if len(result.padded) > 4 else ""))
    details = {"attention_per_sequence": result.attention, "packed_nodes": result.packed_nodes,
               "padded_layout_nodes": len(result.padded)}
    if probe:
        mask_t = probe[MASK_INPUT]
        real, padded = int((mask_t != 0).sum()), mask_t.numel()
        # one rounding for details and note (the collapse report's note once disagreed with its details)
        before, after = round(before, 2), round(forward_ms(graph, probe), 2)
        details.update(tokens_padded=padded, tokens_real=real, latency_ms_before=before, latency_ms_after=after)
        # ×after/before like every report row (a slowdown reads ×>1)
        notes.append(f"first calibration batch {tuple(mask_t.shape)}: {real} of {padded} tokens are real "
                     f"({real / padded:.0%}); one forward {before:.1f} → {after:.1f} ms (×{after / before:.2f}, "
                     f"best of {FORWARD_REPEATS})" + (
                         "; with no padding to remove this is the packing's cost alone (the default calibration "
                         "rows are full: `slimfx eval` times a padded batch)" if real == padded else ""))
        if flops_before:
            notes.append(flops_note(details, flops_before, graph, probe))
    params, nbytes = graph_params(graph), graph_bytes(graph)
    return RuleReport(bound.line, bound.text, "tokens", (), params, params, nbytes, nbytes, details, tuple(notes))


def refuse_tokens_again(graph: ModelGraph, bound: BoundRule, ctx: Context) -> None:
    """Token rules on top of an earlier compile's (passes/token_history.py). Bind refuses them
    first; this holds for a graph that reached the pass another way."""
    refusal = tokens_again_refusal(graph, bound.text)
    if refusal:
        raise rule_error(bound, ctx, "unsupported", *refusal)


def pack_from(graph: ModelGraph, start, bound: BoundRule, ctx: Context) -> PackResult:
    """Pack the tokens from the residual stream `start` on (pack.py). The real tokens are the
    attention mask's nonzeros; a model captured without a mask has only real tokens (a ViT)."""
    mask = _mask_placeholder(graph, bound, ctx, required=False)
    symbols = _symbols(graph, start, bound, ctx)
    try:
        return pack_graph(graph.module, start, mask, symbols)
    except ValueError as e:
        raise rule_error(bound, ctx, "unsupported", f"`{bound.text}` cannot pack the tokens of {graph.model_class}: "
                         f"{e}", "remove the rule; the model runs on the padded batch as before") from e


def _symbols(graph: ModelGraph, start, bound: BoundRule, ctx: Context) -> Symbols:
    """The batch and sequence symbols; for a model captured with a fixed length (a ViT's patches)
    the length T of `start` [B, T, D], which must not also be a feature size the values carry:
    the width, a linear's in/out size, attention's head count or head dim."""
    symbols = Symbols(graph.dim_symbols("batch"), graph.dim_symbols("seq"))
    val = start.meta.get("val")
    if symbols.layout(val) is not None or not isinstance(val, torch.Tensor) or val.dim() != 3 \
            or not isinstance(val.shape[1], int):
        return symbols
    length = val.shape[1]
    features = {("the width", val.shape[2])}
    features |= {(f"{t.path}'s weight", d) for t in graph.targets.values() for d in t.shapes[0]}
    for node in graph.module.graph.nodes:
        if node.target is SDPA:
            q = node.args[0].meta["val"]
            features |= {("the attention heads", q.shape[1]), ("the attention head dim", q.shape[-1])}
    clash = sorted(what for what, size in features if isinstance(size, int) and size == length)
    if clash:
        hint = "capture with another input size"
        table = next((what for what in clash if "position" in what), None)
        if table is not None:
            owner = table.removesuffix("'s weight")
            hint += (f"; {owner} holds exactly {length} positions, so the model "
                     "takes another size only by interpolating it (Hugging Face vision models: add "
                     "interpolate_pos_encoding=True to example_inputs)")
        raise rule_error(bound, ctx, "unsupported", f"{graph.model_class} was captured with a fixed sequence "
                         f"length {length}, which is also {clash[0]}: the pass could not tell them apart", hint)
    return Symbols(symbols.batch, symbols.seq, length)


def flops_note(details: dict, before: int, graph: ModelGraph, probe: dict) -> str:
    """Record the blocks' estimated FLOPs on the batch before → after (flops.py) and say them."""
    lengths = attention_lengths(graph, probe)
    if lengths is None:
        return "FLOPs not estimated: attention is written out by hand"
    after = block_flops(graph, lengths)
    details.update(flops_before=before, flops_after=after)
    return f"blocks' estimated FLOPs on it {_flops(before)} → {_flops(after)} (×{after / before:.2f})"


def _flops(n: int) -> str:
    return f"{n / 1e9:.2f} GFLOP" if n >= 1e9 else f"{n / 1e6:.1f} MFLOP"


def _mask_placeholder(graph: ModelGraph, bound: BoundRule, ctx: Context, required: bool = True):
    for node in graph.module.graph.nodes:
        if node.op == "placeholder" and node.name == MASK_INPUT:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dim() != 2:
                raise rule_error(bound, ctx, "unsupported", f"`tokens unpad` needs a [batch, seq] attention mask; "
                             f"this model's {MASK_INPUT} is {tuple(getattr(val, 'shape', ()))}")
            return node
    if not required:
        return None
    raise rule_error(bound, ctx, "unsupported", *unpad_mask_problem(graph))


def padded_batch(graph: ModelGraph, ctx: Context) -> dict | None:
    """The first calibration batch that has an attention mask (its padding shows the gain), with
    the graph's inputs only: keys it takes no input for ride along in calibration (`labels`,
    `token_type_ids` where it was captured without them), and a call refuses them."""
    for batch in ctx.calib.unread():
        if MASK_INPUT in batch:
            return _inputs_of(graph, batch)
    return None


def probe_batch(graph: ModelGraph, ctx: Context) -> dict | None:
    """What the report measures on: a padded batch where there is one, else the first batch."""
    first = next(iter(ctx.calib.unread()), None)
    return padded_batch(graph, ctx) or (_inputs_of(graph, first) if first is not None else None)


def _inputs_of(graph: ModelGraph, batch: dict) -> dict:
    names = {i.name for i in graph.inputs}
    return {k: v for k, v in batch.items() if k in names}
