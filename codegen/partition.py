"""Fusion groups of a rewritten graph: what one generated kernel each would compute.

- A **GEMM group**: an anchor (`slimfx::quant_linear`, `aten.linear`/`mm`/`addmm`) with its prologue
  (`slimfx::dequantize` read by the anchor only) and its epilogue — the pointwise ops that follow
  it (bias, SiLU/GELU/ReLU, the SwiGLU gate multiply, a residual add, a scale), their other
  operands read from outside. GEMMs that read one activation in one weight format become one
  group (q/k/v; gate and up with the SwiGLU product): one kernel over the concatenated weights.
- A **LoRA adapter** (the adapter pass's tagged nodes: `A`, `B`, `scale`, and `out` = base + scaled
  path) joins its base linear's GEMM group (`Group.lora[base] = (A, B)`): one kernel computes the
  rank-r path beside the base GEMM and adds it in the epilogue, writing no full-size intermediate.
- A **row group**: a chain of pointwise ops with at most one row reduction (RMSNorm, LayerNorm,
  softmax written out or as one op), every output either the rows' full shape or the reduced one.
- Every other op that moves data is a kernel of its own ("opaque": attention, embedding, cat …);
  views and bookkeeping are free (codegen/ops.py).

Nodes join a group in graph order only when no path leaves the group and comes back into it, so
the groups' quotient graph stays acyclic (checked with networkx after partitioning). Shapes are
compared as symbolic expressions, so the groups hold for every batch and sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
import torch
from torch import fx

from .ops import kind_of

__all__ = ["Group", "partition", "check_acyclic"]


@dataclass
class Group:
    kind: str  # "gemm", "rows", "pointwise" or "opaque"
    nodes: list[fx.Node] = field(default_factory=list)  # kernel nodes and the free views between them
    anchor: Optional[fx.Node] = None
    reduction: Optional[fx.Node] = None
    anchors: list[fx.Node] = field(default_factory=list)  # a GEMM group's anchors reading one input
    lora: dict = field(default_factory=dict)  # base anchor -> (A linear, B linear) of its LoRA adapter

    def __post_init__(self):
        if self.anchor is not None and not self.anchors:
            self.anchors.append(self.anchor)

    @property
    def inputs(self) -> list[fx.Node]:
        """Values the group reads from outside it (activations and weights), in first-read order."""
        inside, seen = set(self.nodes), {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in inside:
                    seen.setdefault(a, None)
        return list(seen)

    @property
    def outputs(self) -> list[fx.Node]:
        """Group values read outside it (or by the graph's output)."""
        inside = set(self.nodes)
        return [n for n in self.nodes if any(u not in inside for u in n.users)]

    def describe(self) -> str:
        ops = [str(n.target).replace("aten.", "").replace(".default", "") for n in self.nodes if kind_of(n) != "free"]
        return " → ".join(ops)


def partition(gm: fx.GraphModule | fx.Graph) -> list[Group]:
    """The fusion groups of the graph's kernel ops, in graph order (free nodes join the group of
    the value they view when that group reads them on; views that nothing fuses through stay out)."""
    p = _Partitioner(_graph(gm))
    groups = p.run()
    check_acyclic(gm, groups)
    return groups


def _graph(gm: fx.GraphModule | fx.Graph) -> fx.Graph:
    return gm if isinstance(gm, fx.Graph) else gm.graph


class _Partitioner:
    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.group_of: dict[fx.Node, Group] = {}
        self.groups: list[Group] = []
        self.lora = _lora_paths(graph)

    def run(self) -> list[Group]:
        for node in self.graph.nodes:
            if node in self.group_of:
                continue
            kind = kind_of(node)
            if kind == "anchor":
                self._gemm(node)
            elif kind in ("pointwise", "reduction"):
                self._rows(node)
            elif kind == "opaque":
                self._add(Group("opaque", [node]))
        # A prologue (dequantize) comes before the GEMM that reads it, so it is left for that
        # GEMM to take (taken here first, it was always an eager op: the fused path was dead);
        # one no GEMM took (several readers) runs on its own.
        for node in self.graph.nodes:
            if kind_of(node) == "prologue" and node not in self.group_of:
                self._add(Group("opaque", [node]))
        self._horizontal()
        return sorted(self.groups, key=lambda g: self.order[g.nodes[0]])

    # ---- GEMMs that read one input: one kernel (q/k/v; gate and up with the SwiGLU product) ----
    def _horizontal(self) -> None:
        by_input: dict[tuple, list[Group]] = {}
        for g in self.groups:
            if g.kind == "gemm":
                by_input.setdefault(_anchor_key(g.anchor), []).append(g)
        for family in by_input.values():
            merged = family[0]
            for other in family[1:]:
                if self._independent(merged, other):
                    self._merge(merged, other)
                    merged.anchors.append(other.anchor)
                    merged.lora.update(other.lora)

    def _independent(self, a: Group, b: Group) -> bool:
        """Neither group reads the other through a node outside both (a direct read, such as the
        SwiGLU product reading up's output, stays inside the merged kernel)."""
        both = set(a.nodes) | set(b.nodes)
        for reader, other in ((a, b), (b, a)):
            for value in reader.inputs:
                if value not in both and self._depends_on(value, set(other.nodes)):
                    return False
        return True

    def _merge(self, keep: Group, gone: Group) -> None:
        for n in gone.nodes:
            self._join(keep, n)
        self.groups.remove(gone)

    def _add(self, group: Group) -> Group:
        self.groups.append(group)
        for n in group.nodes:
            self.group_of[n] = group
        return group

    # ---- GEMM: anchor, prologue, epilogue ----
    def _gemm(self, anchor: fx.Node) -> None:
        group = self._add(Group("gemm", [anchor], anchor=anchor))
        for a in anchor.all_input_nodes:
            if kind_of(a) == "prologue" and len(a.users) == 1 and a not in self.group_of:
                self._join(group, a)
        path = self.lora.get(anchor)
        if path is not None and not any(n in self.group_of for n in path):
            for n in path:
                self._join(group, n)
            group.lora[anchor] = (path[-3], path[-2])
        tip = anchor
        while True:
            # The one pointwise reader of the tip continues the epilogue; other readers (the graph's
            # output, a second branch) read the tip as a value the kernel also stores.
            paths = [p for p in (self._through_views(u) for u in tip.users) if p and kind_of(p[-1]) == "pointwise"]
            if len(paths) != 1 or not self._can_join(group, paths[0][-1], paths[0][:-1]):
                break
            for n in paths[0]:
                self._join(group, n)
            tip = paths[0][-1]

    # ---- pointwise chains with at most one row reduction ----
    def _rows(self, start: fx.Node) -> None:
        if kind_of(start) == "pointwise" and self._into_consumer(start):
            return
        group = self._add(Group("rows" if kind_of(start) == "reduction" else "pointwise", [start]))
        if kind_of(start) == "reduction":
            group.reduction = start
        frontier = [start]
        while frontier:
            node = frontier.pop(0)
            for user in sorted(node.users, key=self.order.get):
                path = self._through_views(user)
                if path is None:
                    continue
                last = path[-1]
                kind = kind_of(last)
                if last in self.group_of or kind not in ("pointwise", "reduction"):
                    continue
                if kind == "reduction" and group.reduction is not None:
                    continue
                if not self._can_join(group, last, path[:-1]) or not self._rows_shape_ok(group, last):
                    continue
                for n in path:
                    self._join(group, n)
                if kind == "reduction":
                    group.reduction, group.kind = last, "rows"
                frontier.append(last)
            frontier.sort(key=self.order.get)

    def _into_consumer(self, node: fx.Node) -> bool:
        """A pointwise op whose one reader already sits in a row or pointwise group (the other
        operand of an add a chain took in earlier) joins that group as one more input branch."""
        path = self._single_consumer(node)
        group = self.group_of.get(path[-1]) if path else None
        if group is None or group.kind not in ("pointwise", "rows") or any(v in self.group_of for v in path[:-1]):
            return False
        if _shape(node) != _shape(path[-1]) or not self._can_join(group, node, path[:-1]):
            return False
        for n in (node, *path[:-1]):
            self._join(group, n)
        return True

    def _rows_shape_ok(self, group: Group, node: fx.Node) -> bool:
        """Every value of a row group is the rows' full shape or the reduced one ([…, 1]); a pure
        pointwise group keeps one output shape."""
        shape = _shape(node)
        if shape is None:
            return False
        kernels = [n for n in group.nodes if kind_of(n) != "free"]
        if group.reduction is None and kind_of(node) != "reduction":
            return all(_shape(n) == shape for n in kernels)
        full = _shape(group.reduction.args[0]) if group.reduction is not None else _shape(node.args[0])
        allowed = {full, full[:-1] + ("1",), full[:-1]} if full else set()
        return shape in allowed and all(_shape(n) in allowed for n in kernels)

    # ---- legality ----
    def _single_consumer(self, node: fx.Node) -> Optional[list[fx.Node]]:
        """The path of free views to the one kernel op that reads `node`, when it has one reader."""
        if len(node.users) != 1:
            return None
        return self._through_views(next(iter(node.users)))

    def _through_views(self, user: fx.Node) -> Optional[list[fx.Node]]:
        path = [user]
        while kind_of(path[-1]) == "free" and path[-1].op == "call_function":
            if len(path[-1].users) != 1:
                return None
            path.append(next(iter(path[-1].users)))
        return path if path[-1].op == "call_function" else None

    def _can_join(self, group: Group, node: fx.Node, views: list[fx.Node]) -> bool:
        """`node` may join when no path leaves the group and comes back through it: none of its
        other inputs depends on the group, and nothing it feeds outside the group feeds the group
        (a node the group took in earlier may come after it). And it is in no other group."""
        if node in self.group_of or any(v in self.group_of for v in views):
            return False
        inside = set(group.nodes) | set(views)
        if any(a not in inside and self._depends_on(a, inside) for a in node.all_input_nodes):
            return False
        return not any(u not in inside and self._feeds(u, inside) for u in node.users)

    def _depends_on(self, value: fx.Node, inside: set) -> bool:
        """Whether `value` is computed from the group's nodes, other groups counted as one unit
        (a group runs once all it reads exists, so reaching any of its nodes reaches all of
        their inputs)."""
        return self._search(value, inside, lambda n: n.all_input_nodes)

    def _feeds(self, value: fx.Node, inside: set) -> bool:
        """Whether the group reads something computed from `value` (groups as one unit)."""
        return self._search(value, inside, lambda n: n.users)

    def _search(self, start: fx.Node, inside: set, step) -> bool:
        stack, seen, expanded = [start], set(), set()
        while stack:
            n = stack.pop()
            if n in inside:
                return True
            if n in seen:
                continue
            seen.add(n)
            group = self.group_of.get(n)
            if group is not None:
                if id(group) not in expanded:
                    expanded.add(id(group))
                    for member in group.nodes:
                        stack.extend(step(member))
            else:
                stack.extend(step(n))
        return False

    def _join(self, group: Group, node: fx.Node) -> None:
        group.nodes.append(node)
        group.nodes.sort(key=self.order.get)
        self.group_of[node] = group


def check_acyclic(gm: fx.GraphModule | fx.Graph, groups: list[Group]) -> None:
    """The graph with each group contracted to one node is a DAG (a fused kernel can run once all
    it reads exists). Raises AssertionError naming a cycle: a bug in the partitioner."""
    group_index = {n: i for i, g in enumerate(groups) for n in g.nodes}
    q = nx.DiGraph()
    for node in _graph(gm).nodes:
        here = group_index.get(node, node.name)
        q.add_node(here)
        for a in node.all_input_nodes:
            there = group_index.get(a, a.name)
            if there != here:
                q.add_edge(there, here)
    if not nx.is_directed_acyclic_graph(q):
        cycle = nx.find_cycle(q)
        raise AssertionError(f"fusion groups form a cycle: {cycle}")


def _lora_paths(graph: fx.Graph) -> dict[fx.Node, tuple[fx.Node, ...]]:
    """base linear -> the nodes of its LoRA path, (dropout,) A, B, scale, for every adapter the
    adapter pass tagged whose parts are A, B, scale and out (and its input dropout) with
    `out = base + scale` (DoRA and anything else stays as it is); `out` then joins as the base's
    epilogue. A and B stored in another dtype than the activations are read through their casts
    ("cast" parts), which stay outside the kernel: it reads the cast results."""
    from ..runtime.adapters import tag_of

    parts: dict[str, dict[str, fx.Node]] = {}
    for node in graph.nodes:
        tag = tag_of(node)
        if tag is not None and node.op == "call_function":
            parts.setdefault(tag["target"], {})[tag["part"]] = node
    paths = {}
    for found in parts.values():
        if not {"A", "B", "scale", "out"} <= set(found) <= {"A", "B", "scale", "out", "dropout", "cast"}:
            continue
        a, b, scale, out = found["A"], found["B"], found["scale"], found["out"]
        base = out.args[0] if isinstance(out.args[0], fx.Node) else None
        if base is None or kind_of(base) != "anchor" or out.args[1] is not scale or scale.args[0] is not b \
                or b.args[0] is not a or len(a.users) != 1 or len(b.users) != 1:
            continue
        x = a.args[0]
        dropout = [x] if isinstance(x, fx.Node) and kind_of(x) == "free" and len(x.users) == 1 else []
        paths[base] = (*dropout, a, b, scale)
    order = {n: i for i, n in enumerate(graph.nodes)}
    return dict(sorted(paths.items(), key=lambda kv: order[kv[0]]))


def _anchor_key(anchor: fx.Node) -> tuple:
    """Anchors with the same key read the same activation in the same weight format (quant_linear:
    bits and group), so one kernel can compute them over concatenated weights."""
    target = anchor.target
    fmt = tuple(anchor.args[5:7]) if len(anchor.args) > 6 else ()
    # addmm(bias, x, w): its activation is the second argument (keyed by the bias, two addmms
    # reading one x were never merged, and two sharing a bias were grouped, then split by emit)
    x = anchor.args[1] if target is torch.ops.aten.addmm.default else anchor.args[0]
    return (x, target, fmt)


def _shape(node) -> Optional[tuple[str, ...]]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, (tuple, list)):
        val = val[0] if val else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(str(s) for s in val.shape)
