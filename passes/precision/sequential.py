"""Sequential GPTQ (`quantize … method=gptq`, `sequential=true`, the default): block by block, each
block's Hessians taken on the outputs of the blocks before it *as already compressed*, as the
reference GPTQ and llm-compressor do.

The calibration batches flow through the graph one block at a time (`Stream`, passes/stream.py): per batch, only the
values later nodes still read are kept (the residual stream, the masks and rotary tables the
preamble made), never the whole model's activations. For each block:

1. run its nodes on the kept values, recording each target's input into one `HessianAccumulator`
   per input value (q/k/v share one, gate/up another: one accumulation each);
2. GPTQ every target of the block;
3. put the dequantized weights in place of the float ones (new tensors: the float ones, perhaps
   the user's own storage, are never written; passes/lent.py), run the block again so the values
   handed to the next block are those of the compressed block, and put the float weights back
   (the graph is rewritten once, at the end, as without `sequential`).

Peak memory beyond the model: one block's Hessians, the kept values of each batch at one block
boundary, and one block's dequantized weights; the first two are measured and reported (`peak_bytes`).
`sequential_scores` walks the blocks the same way to score formats for the budget solver. Targets outside blocks (a quantized head) come last,
on the outputs of every compressed block.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Protocol

import torch
from torch import fx

from ..calibrate import paired_moment
from ..graph import ModelGraph
from ..lent import put_tensor, replace_tensor
from ..residual import block_stream, residual_partner
from ..rewrite import weight_name
from ..stream import Stream
from .encode import Encoded, decode
from .gptq import HessianAccumulator
from .targets import Item, site_hessians, site_inputs

__all__ = ["sequential_encode", "sequential_scores", "Compensate"]

class Compensate(Protocol):
    """What the sweep asks of a low-rank error correction (passes/precision/compensate.py), in two
    steps so that C (19 MiB for SmolLM2's down_proj input) is gone before GPTQ runs."""

    def aim(self, it: Item, H: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor | None:
        """The weight to encode toward, or None: H = E[x xᵀ] of the input in the compressed model,
        C = E[x_ref xᵀ] with the original model's input at the same rows, D = E[(r_ref − r) xᵀ]
        with the residual stream the output is added to (passes/residual.py) or None."""

    def encode(self, it: Item, H: torch.Tensor, aim: torch.Tensor | None,
               encode_one: Callable[[Item, torch.Tensor], Encoded]) -> tuple[Encoded, torch.Tensor | None]:
        """(the encoding, a float32 [out, in] term added to the decoded weight, or None)."""


def sequential_encode(graph: ModelGraph, items: list[Item], batches: list[dict[str, Any]],
                      encode_one: Callable[[Item, torch.Tensor], Encoded], progress_step,
                      by_layer: bool = False, compensate: Compensate | None = None
                      ) -> tuple[dict[str, Encoded], int, int]:
    """(path -> encoding, calibration rows per target, peak bytes held), block by block (module
    doc); `encode_one(item, H)` encodes one target. `by_layer` (true-sequential): inside a block
    too, each group of targets reading one input is calibrated on the block's sublayers before it
    as already compressed (q/k/v, then o, then gate/up, then down). `compensate` (`Compensate`)
    encodes each target in encode_one's place, toward the weight its `aim` gives, and returns a
    float32 [out, in] term the rest of the sweep adds to the decoded weight (a low-rank error
    correction, passes/precision/compensate.py), or None; it makes the sweep go by layer, so that
    H is the input the corrected sublayers before it compute."""
    if by_layer or compensate is not None:
        return _sweep_by_layer(graph, items, batches, encode_one, progress_step, compensate)
    return _sweep(graph, items, batches, encode_one, progress_step, compressed=True)


def sequential_scores(graph: ModelGraph, items: list[Item], batches: list[dict[str, Any]],
                      score_one: Callable[[Item, torch.Tensor], Any], progress_step
                      ) -> tuple[dict[str, Any], int, int]:
    """(path -> score_one(item, H), rows, peak bytes) with the same bounded memory, on the
    outputs of the uncompressed blocks (what to compress them to is what the scores decide)."""
    return _sweep(graph, items, batches, score_one, progress_step, compressed=False)


def _sweep(graph: ModelGraph, items: list[Item], batches: list[dict[str, Any]], per_item: Callable,
           progress_step, compressed: bool) -> tuple[dict[str, Any], int, int]:
    order, blocks, plan = _blocks_in_order(graph, items)
    stream = Stream(graph, batches)
    out: dict[str, Any] = {}
    rows, peak = 0, 0
    for last, key, block_items in plan:
        accs: dict[fx.Node, HessianAccumulator] = {}
        for it in block_items:
            for site in it.sites:
                accs.setdefault(site.x, HessianAccumulator())
        span = set() if key is None else _block_span(order, blocks[key], last)
        reads = frozenset(a for n in span for a in n.all_input_nodes) - span  # read again by the re-run
        # The compressed sweep runs the block again below with its encoded weights: the first run
        # stops at the last input a target reads (the rest of the block, thrown away, was 74% of
        # an attention rule's first runs on SmolLM2).
        stop = max(accs, key=order.__getitem__) if key is not None and compressed else last
        stream.run_through(stop, {x: [acc.add] for x, acc in accs.items()}, pin=reads)
        rows = max([rows, *(acc.count for acc in accs.values())])
        peak = max(peak, stream.nbytes() + sum(acc.H.nbytes for acc in accs.values() if acc.count))
        for it in block_items:
            progress_step(0, note=it.path)
            out[it.path] = per_item(it, site_hessians(it, accs).H)  # a linear called twice: both inputs
            progress_step()
        del accs
        if key is not None and compressed:  # the next block reads this block's compressed outputs
            with _swapped(graph, block_items, {it.path: decode(out[it.path], it.w) for it in block_items
                                               if out[it.path] is not None}):
                stream.forget(span)
                stream.run_through(last, {})
    return out, rows, peak


def _blocks_in_order(graph: ModelGraph, items: list[Item]):
    """[(last node of the block or None, its items)], blocks in graph order, then targets outside."""
    order = {n: i for i, n in enumerate(graph.module.graph.nodes)}
    by_block: dict[int | None, list[Item]] = {}
    for it in items:
        by_block.setdefault(it.target.block, []).append(it)
    blocks = {b.index: b for b in graph.blocks}
    return order, blocks, [(None if key is None else max(blocks[key].nodes, key=order.__getitem__), key,
                            by_block[key]) for key in sorted(by_block, key=lambda b: (b is None, b or 0))]


def _sweep_by_layer(graph: ModelGraph, items: list[Item], batches: list[dict[str, Any]], per_item: Callable,
                    progress_step, compensate: Compensate | None = None) -> tuple[dict[str, Any], int, int]:
    """True-sequential: the stream stops at each input a group of targets reads, the group is
    encoded on it and its dequantized weights go in before the stream runs on, so every later
    input of the block is computed by the compressed sublayers before it; the block is never
    run twice. With `compensate`, a second stream runs the same batches through the graph with its
    float weights (the original model: every block before is back to float) to the same input,
    so that each input's C = E[x_ref xᵀ] pairs the original model's rows with the compressed
    model's; `compensate` gets it beside H, and for a target whose output is added to
    the residual stream, D = E[(r_ref − r) xᵀ] from both streams' values of it (held then: the add
    that reads them comes after the target)."""
    order, blocks, plan = _blocks_in_order(graph, items)
    stream = Stream(graph, batches)
    reference = None if compensate is None else Stream(graph, batches)
    out: dict[str, Any] = {}
    rows, peak = 0, 0
    for last, key, block_items in plan:
        residual_values = frozenset() if compensate is None or key is None else block_stream(blocks[key], order)
        groups: dict[fx.Node, list[Item]] = {}
        # A target read at several sites (a linear called twice) is encoded at its last input, on
        # the rows of all of them, each recorded as the stream computes it (`elsewhere`).
        elsewhere: dict[str, dict[fx.Node, HessianAccumulator]] = {}
        for it in block_items:
            inputs = site_inputs(it)
            if len(inputs) > 1:  # (one with an error-fitted adapter was refused: compensate.py)
                elsewhere[it.path] = {x: HessianAccumulator() for x in inputs}
            groups.setdefault(max(inputs, key=order.__getitem__), []).append(it)
        unwatched = [(y, acc) for accs in elsewhere.values() for y, acc in accs.items()]
        in_use: dict[str, torch.Tensor] = {}  # path -> the weight the compressed block computes with
        for x in sorted(groups, key=order.__getitem__):
            acc = HessianAccumulator()
            if reference is not None:
                reference.run_through(x, {})  # before the swaps: float weights
            watch = {x: [acc.add]}
            # the other inputs, at the first run that reaches them (one held from before the block too)
            reached = [(y, other) for y, other in unwatched if order[y] <= order[x]]
            unwatched = [(y, other) for y, other in unwatched if order[y] > order[x]]
            for y, other in reached:
                watch.setdefault(y, []).append(other.add)
            with _swapped(graph, block_items, in_use):  # the groups before x, encoded
                stream.run_through(x, watch)
            rows = max(rows, acc.count)
            # Both streams hold x now (the linears reading it come next): C = E[x_ref xᵀ] pairs
            # their rows batch by batch, with no copy of either kept.
            x_rows = None if reference is None else stream.rows(x)  # C's and every D's right side
            C = None if reference is None else paired_moment(zip(reference.rows(x), x_rows))
            held = stream.nbytes() + acc.H.nbytes
            peak = max(peak, held if C is None else held + reference.nbytes() + C.nbytes)
            for i, it in enumerate(groups[x]):
                progress_step(0, note=it.path)
                H = site_hessians(it, elsewhere[it.path]).H if it.path in elsewhere else acc.H
                if compensate is None:
                    enc, fix = per_item(it, H), None
                else:
                    r = residual_partner(it.sites[0], residual_values)
                    D = None if r is None else _stream_drift(stream, reference, r, x_rows)
                    aim = compensate.aim(it, H, C, D)
                    del D
                    if i == len(groups[x]) - 1:  # the group's last aim is made: C goes before GPTQ
                        C = x_rows = None
                    enc, fix = compensate.encode(it, H, aim, per_item)
                    del aim
                out[it.path] = enc
                if enc is not None:
                    w_hat = decode(enc, it.w)
                    in_use[it.path] = w_hat if fix is None else w_hat + fix
                progress_step()
            del acc, C, x_rows
        with _swapped(graph, block_items, in_use):
            stream.run_through(last, {})  # the rest of the block, on the compressed sublayers
        if reference is not None:
            reference.run_through(last, {})
    return out, rows, peak


def _stream_drift(stream: Stream, reference: Stream, r: fx.Node, x_rows: list[torch.Tensor]) -> torch.Tensor:
    """D = E[(r_ref − r) xᵀ] [features of r, features of x] over every real row of every batch:
    the residual stream's drift at r (the reference stream's value minus the compressed one's)
    against the compressed model's input x (`x_rows`, each batch's); both streams hold r now."""
    return paired_moment((r_ref - r_now, xs) for r_ref, r_now, xs in
                         zip(reference.rows(r), stream.rows(r), x_rows, strict=True))


def _block_span(order: dict, block, last: fx.Node) -> set[fx.Node]:
    """Every node from the block's first through `last`, in graph order (what its re-run computes)."""
    first = min(order[n] for n in block.nodes)
    return {n for n, i in order.items() if first <= i <= order[last]}


@contextmanager
def _swapped(graph: ModelGraph, items: list[Item], weights: dict[str, torch.Tensor]):
    """Within the block, each item's weight is `weights[path]` (its decoded weight, perhaps
    corrected; an item not there is kept as it is): a new tensor in the weight's place, so the
    original (perhaps the user's own storage, passes/lent.py) is never written."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for it in items:
            w_hat = weights.get(it.path)
            if w_hat is None:
                continue
            param = graph.param(weight_name(it.target))
            saved.append((param, replace_tensor(graph.module, param, w_hat.T if it.target.transposed else w_hat)))
        yield
    finally:
        for param, decoded in saved:
            put_tensor(graph.module, decoded, param)
