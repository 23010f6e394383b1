"""The fusion-group table `slimfx compile --stats` prints (and benchmarks/traffic.py): groups of
the rewritten graph as the code generator partitions it, with the memory-traffic model's bytes
for one run on example inputs, unfused (one kernel per op) against fused (one per group)."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from torch import fx

from ..runtime.report import format_bytes
from .lower import lower_graph
from .ops import kind_of
from .partition import Group
from .traffic import Traffic, fused_traffic, measure

__all__ = ["Stats", "stats"]


@dataclass
class Stats:
    unfused: Traffic
    fused: Traffic
    groups: list[Group]
    generated: int = 0  # what backend="triton" launches today: generated kernel calls …
    eager_ops: int = 0  # … and the ops of groups no template expresses yet (one kernel each)

    def rows(self) -> list[tuple[int, str, str, int]]:
        """(how many, kind, ops, bytes they move) per distinct group, most frequent first."""
        count: collections.Counter = collections.Counter()
        moved: dict[tuple[str, str], int] = collections.defaultdict(int)
        for g in self.groups:
            key = (g.kind, g.describe())
            count[key] += 1
            moved[key] += fused_traffic([g]).total_bytes
        return [(n, kind, ops, moved[kind, ops]) for (kind, ops), n in count.most_common()]

    def render(self, top: int = 20) -> str:
        u, f = self.unfused, self.fused
        lines = [
            "fusion groups (codegen/partition.py) and memory traffic for one run on the example inputs",
            f"  unfused: {u.kernels} kernels, {format_bytes(u.activation_bytes)} of activations, "
            f"{format_bytes(u.weight_bytes)} of weights",
            f"  fused:   {f.kernels} kernels ({f.kernels / max(u.kernels, 1):.0%}), "
            f"{format_bytes(f.activation_bytes)} of activations "
            f"({f.activation_bytes / max(u.activation_bytes, 1):.0%}), {format_bytes(f.weight_bytes)} of weights",
            f"  {'count':>5}  {'kind':<9}  {'bytes moved':>11}  ops",
        ]
        lines.insert(3, f"  backend=\"triton\" today: {self.generated} generated kernel calls + {self.eager_ops} eager "
                        f"ops = {self.generated + self.eager_ops} launches "
                        f"({(self.generated + self.eager_ops) / max(u.kernels, 1):.0%} of unfused)")
        rows = self.rows()
        for n, kind, ops, nbytes in rows[:top]:
            lines.append(f"  {n:>5}  {kind:<9}  {format_bytes(nbytes):>11}  {ops}")
        if len(rows) > top:
            lines.append(f"  … {len(rows) - top} more distinct groups")
        return "\n".join(lines)


def stats(gm: fx.GraphModule, inputs: list[Any]) -> Stats:
    """The table's figures for one run of `gm` (the graph before lowering) on `inputs`."""
    unfused, fused, groups = measure(gm, inputs)
    lowered, summary = lower_graph(gm.graph)
    eager_ops = sum(1 for n in lowered.nodes if n.op in ("call_function", "call_module")
                    and not hasattr(n.target, "kernel") and kind_of(n) != "free")
    return Stats(unfused, fused, groups, summary.kernels, eager_ops)
