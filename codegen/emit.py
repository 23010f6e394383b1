"""From fusion groups to kernels: which template emits each group, and what happens when the
template cannot express it.

- A GEMM group merged horizontally (q/k/v; gate and up) is one kernel when the GEMM template
  takes it; otherwise it is split back into one group per anchor: each epilogue node goes with
  the latest anchor it depends on (the SwiGLU product with `up`, reading `silu(gate)` as an
  operand), so the pieces run in graph order and stay acyclic.
- A GEMM whose epilogue the template refuses runs as the anchor (and its dequantize prologue)
  alone; the epilogue's ops stay eager ops.
- A row or pointwise group the template refuses stays eager ops; an opaque group always does.

Every refusal is kept with its reason (`Emitted.eager`), for the lowering summary: nothing is
dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .emit_gemm import emit_gemm, owners
from .emit_rows import emit_rows
from .expr import Unsupported
from .kernel import Kernel
from .ops import kind_of
from .partition import Group

__all__ = ["Emitted", "emit_all", "split_anchors"]


@dataclass
class Emitted:
    kernels: list[Kernel] = field(default_factory=list)
    eager: list[tuple[Group, str]] = field(default_factory=list)  # (group left to eager ops, why)


def emit_all(groups: list[Group]) -> Emitted:
    done = Emitted()
    for group in groups:
        if group.kind == "opaque":
            continue
        if group.kind == "gemm":
            _gemm(group, done)
            continue
        try:
            done.kernels.append(emit_rows(group))
        except Unsupported as why:
            done.eager.append((group, _reason(group, why)))
    return done


def _reason(group: Group, why: Exception) -> str:
    """The refusal without the name of the node (of the group, or one it reads) it starts with, so
    equal reasons count together; where the name was the sentence's subject, a noun takes its
    place ("a value is torch.int64: …", "an op (aten.view) reorders …")."""
    text = str(why)
    names = {n.name for n in group.nodes} | {i.name for n in group.nodes for i in n.all_input_nodes}
    head, sep, rest = text.partition(" ")
    if head.endswith(":") and head[:-1] in names:
        return rest
    if sep and head in names:
        return ("an op " if rest.startswith("(aten.") else "a value ") + rest
    return text


def _gemm(piece: Group, done: Emitted) -> None:
    """The group as one kernel; else one kernel per anchor (each with its share of the
    epilogue); else the anchor alone, its epilogue left to eager ops; else all eager ops."""
    try:
        done.kernels.append(emit_gemm(piece))
        return
    except Unsupported as why:
        reason = _reason(piece, why)
    if len(piece.anchors) > 1:
        for part in split_anchors(piece):
            _gemm(part, done)
        return
    core = [n for n in piece.nodes if n is piece.anchor or kind_of(n) == "prologue"]
    rest = [n for n in piece.nodes if n not in core]
    if rest:
        try:
            done.kernels.append(emit_gemm(Group("gemm", core, anchor=piece.anchor)))
            done.eager.append((Group("pointwise", rest), f"epilogue not fused: {reason}"))
            return
        except Unsupported as why:
            reason = _reason(piece, why)
    done.eager.append((piece, reason))


def split_anchors(group: Group) -> list[Group]:
    """One GEMM group per anchor (module doc); a one-anchor group is returned as it is."""
    if len(group.anchors) <= 1:
        return [group]
    owner = owners(group)
    anchors = sorted(group.anchors, key=group.nodes.index)
    return [Group("gemm", [n for n in group.nodes if owner[n] is a], anchor=a,
                  lora={a: group.lora[a]} if a in group.lora else {}) for a in anchors]
