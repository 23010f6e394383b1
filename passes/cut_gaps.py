"""The gaps a `heal` repairs, as bind sees them: the contiguous runs of the model's blocks a view
after `collapse`/`drop` rules lacks (a drop on both sides of an earlier gap makes one gap with it,
as compile does), and the linears a LoRA heal puts adapters beside. Core."""
from __future__ import annotations

from .graph import Block, ModelGraph, Target

__all__ = ["gap_edges", "heal_neighbours"]


def gap_edges(whole: ModelGraph, view) -> list[tuple[Block | None, Block | None]]:
    """Per gap: (the remaining block before it, the one after it), `whole`'s own Blocks, None at
    either end of the model. Its length is the number of cuts a `heal` repairs."""
    left = {b.path for b in view.blocks}
    edges, before, in_gap = [], None, False
    for block in whole.blocks:
        if block.path not in left:
            in_gap = True
            continue
        if in_gap:
            edges.append((before, block))
            in_gap = False
        before = block
    if in_gap:
        edges.append((before, None))
    return edges


def heal_neighbours(whole: ModelGraph, view, reach: int) -> list[Target]:
    """The view's linears in the remaining blocks up to `reach` before and after each gap: where a
    LoRA heal puts its adapters (collapse/heal.py's _neighbour_linears, on the cuts compile makes)."""
    present = [b.path for b in whole.blocks if b.path in {v.path for v in view.blocks}]
    near: set[str] = set()
    for before, after in gap_edges(whole, view):
        if before is not None:
            i = present.index(before.path)
            near.update(present[max(0, i - reach + 1):i + 1])
        if after is not None:
            j = present.index(after.path)
            near.update(present[j:j + reach])
    return [t for t in view.targets.values()
            if t.kind == "linear" and t.block is not None and view.blocks[t.block].path in near]
