"""A memory-traffic model of a graph, unfused (one kernel per op, as eager PyTorch runs it) and
fused (one kernel per fusion group of partition.py): kernels launched and bytes each reads and
writes, activations apart from weights. Measurable without a GPU: the sizes come from one run of
the graph on example inputs (torch.fx's ShapeProp), so symbolic and data-dependent sizes are
those of that input.

A view reads nothing itself; a kernel that reads a view reads at most the view's elements and at
most its base's (an expanded mask is read once per element of its source, a slice only in part).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from .lower import drop_metadata_asserts
from .ops import kind_of
from .partition import Group, partition

__all__ = ["Traffic", "measure", "unfused_traffic", "fused_traffic"]


@dataclass(frozen=True)
class Traffic:
    kernels: int
    activation_bytes: int  # read + written, everything but weights
    weight_bytes: int  # read from parameters and buffers

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.weight_bytes


def measure(gm: fx.GraphModule, inputs: list[Any]) -> tuple[Traffic, Traffic, list[Group]]:
    """(unfused, fused, groups) for one run of `gm` on `inputs` (positional, in placeholder order)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    graph = fx.Graph()  # partitioned as lowering does: without export's metadata checks (lower.py)
    graph.output(graph.graph_copy(gm.graph, {}))
    drop_metadata_asserts(graph)
    groups = partition(graph)
    return unfused_traffic(gm), fused_traffic(groups), groups


def unfused_traffic(gm: fx.GraphModule) -> Traffic:
    kernels = [n for n in gm.graph.nodes if kind_of(n) not in ("free",)]
    return _sum(([n], n.all_input_nodes, [n]) for n in kernels)


def fused_traffic(groups: list[Group]) -> Traffic:
    return _sum((g.nodes, g.inputs, g.outputs) for g in groups)


def _sum(kernels) -> Traffic:
    count = act = weights = 0
    for _, reads, writes in kernels:
        count += 1
        for value in _distinct(reads):
            nbytes = _bytes(value)
            if _base(value).op == "get_attr":
                weights += nbytes
            else:
                act += nbytes
        act += sum(_bytes(_base(w)) for w in _distinct(writes))
    return Traffic(count, act, weights)


def _distinct(values) -> list[fx.Node]:
    """One entry per storage: a value and a view of it read together are read once."""
    seen, out = set(), []
    for v in values:
        base = _base(v)
        if base not in seen:
            seen.add(base)
            out.append(v)
    return out


def _base(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and kind_of(node) == "free" and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _bytes(node: fx.Node) -> int:
    """Bytes of the value (at most those of its base, for a view)."""
    own = _meta_bytes(node.meta.get("tensor_meta"))
    base = _base(node)
    return min(own, _meta_bytes(base.meta.get("tensor_meta"))) if base is not node else own


def _meta_bytes(meta) -> int:
    if meta is None:
        return 0
    if not hasattr(meta, "shape"):  # a tuple or dict of outputs (TensorMetadata is a NamedTuple too)
        items = meta.values() if isinstance(meta, dict) else meta if isinstance(meta, (tuple, list)) else ()
        return sum(_meta_bytes(m) for m in items)
    numel = 1
    for s in meta.shape:
        numel *= int(s)
    return numel * meta.dtype.itemsize
