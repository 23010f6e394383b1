"""The model as later rules see it after a `collapse`/`drop`: some blocks gone, the rest
renumbered (`blocks[8]` after four blocks are dropped is the ninth remaining block), `blocks.*`
the remaining ones. bind() resolves each rule against the view its position in the policy
gives, before any weight is touched; the pipeline's graph after the pass has the same index.

A view answers what selector resolution and size estimates ask of a ModelGraph (blocks, targets,
modules, by_role, block_of) and nothing else: it has no fx graph to run.
"""
from __future__ import annotations

from dataclasses import replace

from .graph import Block, ModelGraph, Target, _block_of

__all__ = ["BlocksView", "without_blocks"]


class BlocksView:
    """A ModelGraph's index minus some blocks."""

    def __init__(self, base: "ModelGraph | BlocksView", removed: set[str]):
        self.model_class, self.blocks_path = base.model_class, base.blocks_path
        # the captured graph, for what reads its parameters (the blocks left keep their paths)
        self.source: ModelGraph = getattr(base, "source", base)
        prefixes = tuple(p + "." for p in removed)
        kept = [b for b in base.blocks if b.path not in removed]
        self.blocks = tuple(replace(b, index=i) for i, b in enumerate(kept))
        # for a selector's errors: `blocks[1]` out of range in a view of one block, where the
        # model has two, said nothing of the rules above that removed the other
        self.removed_count = getattr(base, "removed_count", 0) + len(base.blocks) - len(kept)
        renumber = {b.index: i for i, b in enumerate(kept)}
        self.targets: dict[str, Target] = {
            p: (replace(t, block=renumber[t.block]) if t.block is not None else t)
            # a block that is itself a target (a ModuleList of Linears) goes with its block
            for p, t in base.targets.items() if p not in removed and not p.startswith(prefixes)}
        self.modules = {p: m for p, m in base.modules.items() if p not in removed and not p.startswith(prefixes)}
        if self.blocks_path is not None and self.blocks_path in self.modules:
            info = self.modules[self.blocks_path]
            names = {p.rpartition(".")[2] for p in removed}
            self.modules[self.blocks_path] = replace(info, children=tuple(c for c in info.children if c not in names))

    def block_of(self, path: str) -> Block | None:
        return _block_of(path, self.blocks_path, self.blocks)

    def by_role(self, role: str, block: int | None = None) -> list[Target]:
        return [t for t in self.targets.values() if t.role == role and (block is None or t.block == block)]


def without_blocks(graph: "ModelGraph | BlocksView", removed: set[str]) -> "ModelGraph | BlocksView":
    return BlocksView(graph, removed) if removed else graph
