"""The residual stream on calibration tokens. Stream k enters block k (stream 0 enters the first
block, stream L leaves the last); every measure here is over the real tokens of the calibration
batches (padding left out) and runs the graph as earlier rules left it.

- `similarities`: mean cosine between stream i and stream j for every j − i ≤ max_gap, in one
  forward: block influence (ShortGPT) is 1 − sim(i, i+1), the angular distance of a run of n
  blocks (Gromov et al. 2024) is arccos(sim(i, i+n)) / π.
- `collect`: the rows of chosen streams, per batch (what a removed run output, for `heal`).
- `final_similarity`: LaCo's trial — run the graph as if a run of blocks were gone (and the kept
  block's weights merged in place), and compare the last stream with a reference.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from ...runtime.progress import Progress
from ...runtime.report import counted
from ..calibrate import kept_rows, observe, real_rows
from ..graph import ModelGraph
from ..rewrite import PassError

__all__ = ["stream_node", "similarities", "collect", "final_similarity", "angular", "StreamSums"]


def stream_node(graph: ModelGraph, k: int) -> fx.Node:
    """The node of stream k: block k's residual input (k = L: the last block's output)."""
    blocks = graph.blocks
    node = blocks[0].input if k == 0 else blocks[k - 1].output
    if node is None:
        raise PassError(f"{graph.model_class}: the residual stream around block {k} is not known")
    return node


def angular(cos: float) -> float:
    """Angular distance in [0, 1]: arccos(cos) / π."""
    return math.acos(max(-1.0, min(1.0, cos))) / math.pi


class StreamSums:
    """Sums of per-token cosines between stream pairs, averaged on read."""

    def __init__(self):
        self.sums: dict[tuple[int, int], float] = {}
        self.tokens: dict[tuple[int, int], int] = {}

    def add(self, i: int, j: int, a: torch.Tensor, b: torch.Tensor) -> None:
        cos = F.cosine_similarity(a.double(), b.double(), dim=-1)
        self.sums[i, j] = self.sums.get((i, j), 0.0) + cos.sum().item()
        self.tokens[i, j] = self.tokens.get((i, j), 0) + cos.numel()

    def __getitem__(self, pair: tuple[int, int]) -> float:
        return self.sums[pair] / max(1, self.tokens[pair])


def _each_batch(graph: ModelGraph, streams: list[int], batches, progress: Progress | None, description: str,
                on_batch: Callable[[dict[int, torch.Tensor]], None]) -> None:
    """Run every batch once; hand `on_batch` the rows of the chosen streams of that batch."""
    nodes = {k: stream_node(graph, k) for k in streams}
    with (progress or Progress()).task(f"{description} ({counted(len(batches), 'batch')})", total=len(batches)) as step:
        for batch in batches:
            rows: dict[int, torch.Tensor] = {}
            watch: dict[fx.Node, list] = {}
            for k, node in nodes.items():
                watch.setdefault(node, []).append(lambda r, k=k: rows.__setitem__(k, r.clone()))
            observe(graph, watch, [batch])
            on_batch(rows)
            step()


def similarities(graph: ModelGraph, batches, max_gap: int, progress: Progress | None = None) -> StreamSums:
    """Mean cosine of stream i and stream j over calibration tokens, for 1 ≤ j − i ≤ max_gap."""
    L = len(graph.blocks)
    sums = StreamSums()

    def on_batch(rows):
        for i in range(L):
            for j in range(i + 1, min(L, i + max_gap) + 1):
                sums.add(i, j, rows[i], rows[j])

    _each_batch(graph, list(range(L + 1)), batches, progress, "measuring the residual stream", on_batch)
    return sums


def collect(graph: ModelGraph, streams: list[int], batches, progress: Progress | None = None,
            description: str = "recording the residual stream") -> dict[int, list[torch.Tensor]]:
    """Rows of each chosen stream, one tensor per batch."""
    out: dict[int, list[torch.Tensor]] = {k: [] for k in streams}
    _each_batch(graph, streams, batches, progress, description,
                lambda rows: [out[k].append(rows[k]) for k in streams])
    return out


class _Trial(fx.Interpreter):
    """Runs the graph with the nodes of `skip` not computed and `jump_to` (a removed run's output)
    reading the value of `jump_from` (the stream that entered the run); records `record`'s value.
    The entering value is held here: the interpreter frees it after its last use in the graph,
    which is inside the skipped run."""

    def __init__(self, module: fx.GraphModule, skip: frozenset, jump_from: fx.Node, jump_to: fx.Node,
                 record: fx.Node):
        super().__init__(module)
        self.skip, self.jump_from, self.jump_to, self.record = skip, jump_from, jump_to, record
        self.entering = self.value = None

    def run_node(self, n: fx.Node) -> Any:
        if n is self.jump_to:
            result = self.entering
        elif n in self.skip:
            return None
        else:
            result = super().run_node(n)
        if n is self.jump_from:
            self.entering = result
        if n is self.record:
            self.value = result
        return result


def final_similarity(graph: ModelGraph, skip_blocks: list, batches, reference: list[torch.Tensor]) -> float:
    """Mean cosine, over calibration tokens, between the last stream of the graph run without
    the contiguous `skip_blocks` and `reference` (one rows tensor per batch)."""
    first, last = skip_blocks[0], skip_blocks[-1]
    skip = frozenset().union(*(b.nodes for b in skip_blocks))
    record = stream_node(graph, len(graph.blocks))
    names = [i.name for i in graph.inputs]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch, ref in zip(batches, reference):
            trial = _Trial(graph.module, skip, first.input, last.output, record)
            trial.run(*(batch[n] for n in names))
            rows = real_rows(trial.value, kept_rows(batch))
            cos = F.cosine_similarity(rows.double(), ref.double(), dim=-1)
            total, tokens = total + cos.sum().item(), tokens + cos.numel()
    return total / max(1, tokens)
