"""Removing blocks from the graph: the residual stream that entered a removed run now flows where
the run's output flowed. No model class is assumed: the ModelGraph's index knows each block's
node set and its residual input and output.

A `Cut` records one removed run for a later `heal`: where the stream now jumps over the gap, and
what left the run in the model as the policy's first collapse/drop found it (on the calibration
tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import fx

from ..block_reads import read_after, stream_between, token_pack
from ..graph import Block, ModelGraph
from ..lent import replace_tensor
from ..rewrite import PassError
from ...runtime.forward_parts import recompile

__all__ = ["Cut", "remove_run", "laco_merge"]


@dataclass
class Cut:
    """One contiguous run of removed blocks (for a LaCo merge: the blocks merged away)."""

    line: int  # the rule that made it
    removed: tuple[str, ...]  # module paths of the removed blocks
    stream: fx.Node  # the residual value that now flows where the run's output flowed
    before: str | None  # path of the block just before the gap (None: the gap starts at block 0)
    after: str | None  # path of the block just after it (None: the gap ends at the last block)
    target: list[torch.Tensor] = field(default_factory=list, repr=False)  # per calibration batch:
    # what left the run in the model as the policy's first collapse/drop found it, rows of real
    # tokens [tokens, hidden]
    record: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)  # the same for
    # every block from the rule's first change on, by path: a later rule's cut there is fitted to
    # it (apply.block_record); `heal` empties it (no collapse/drop may follow a heal)


def remove_run(graph: ModelGraph, run: list[Block]) -> fx.Node:
    """Remove a contiguous run of blocks; return the residual node that now flows past the gap.

    The run's last output is replaced, in every use, by the first block's residual input (where a
    `tokens` rule packed it, the pack now packs that input); then the run's nodes, the get_attr
    nodes of its tensors, its submodules and its rows of the module table go. The graph is
    re-indexed (later blocks renumbered) before this returns."""
    first, last = run[0], run[-1]
    if [b.index for b in run] != list(range(first.index, last.index + 1)):
        raise PassError(f"remove_run needs contiguous blocks, got {[b.index for b in run]}")
    if first.input is None or last.output is None:
        raise PassError(f"{first.path}: the residual stream through the block is not known")
    members = frozenset().union(*(b.nodes for b in run))
    between = stream_between(run)
    leak = read_after(run)
    if leak is not None:  # apply.py refuses such a run at its rule first
        raise PassError(f"{leak.name} is computed inside {first.path} and read after it (e.g. a shared "
                        "position bias): this model's blocks cannot be removed by slimfx yet")
    gm, stream = graph.module, first.input
    carried = token_pack(last)
    if carried is not None:  # the tokens packed on leaving the run are packed on entering it
        carried.replace_input_with(carried.args[0], first.input)
        carried.meta.pop("nn_module_stack", None)
        if "nn_module_stack" in first.input.meta:  # it stays the output of what made its input
            carried.meta["nn_module_stack"] = first.input.meta["nn_module_stack"]
        members, between, stream = members - {carried}, between - {carried}, carried
    for n in between:
        n.replace_all_uses_with(first.input, delete_user_cb=lambda u: u not in members)
    for n in sorted(members, key=graph.node_order.__getitem__, reverse=True):
        gm.graph.erase_node(n)
    prefixes = tuple(b.path + "." for b in run)
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users and n.target.startswith(prefixes):
            gm.graph.erase_node(n)
    _forget_modules(graph, [b.path for b in run])
    recompile(gm)
    graph.reindex()
    return stream


def _forget_modules(graph: ModelGraph, paths: list[str]) -> None:
    gm, parent_path = graph.module, graph.blocks_path
    parent = gm.get_submodule(parent_path)
    names = {p[len(parent_path) + 1:] if parent_path else p for p in paths}
    for name in names:
        delattr(parent, name)
    prefixes = tuple(p + "." for p in paths)
    for path in [p for p in graph.modules if p in paths or p.startswith(prefixes)]:
        del graph.modules[path]
    info = graph.modules[parent_path]
    graph.modules[parent_path] = replace(info, children=tuple(c for c in info.children if c not in names))


def laco_merge(graph: ModelGraph, keep: Block, merged: list[Block]) -> int:
    """LaCo's parameter merge: θ_keep ← θ_keep + Σ_k (θ_k − θ_keep) over the merged blocks, for
    every floating-point parameter (buffers such as rotary frequencies are left as they are).
    Returns how many tensors changed. The merged blocks themselves are not removed here."""
    own = _block_params(graph, keep)
    changed = 0
    for rel, theta in own.items():
        others = []
        for b in merged:
            other = _block_params(graph, b).get(rel)
            if other is None or other.shape != theta.shape:
                raise PassError(f"{b.path}{rel} does not match {keep.path}{rel}: blocks of different "
                                "shape cannot be merged")
            others.append(other)
        with torch.no_grad():
            delta = sum((o.float() - theta.float() for o in others), torch.zeros_like(theta, dtype=torch.float32))
            # a new tensor, never an in-place add: theta may be the user's own storage (lent.py);
            # summed in float32 and rounded once (a half delta rounded first moved 35% of a bf16
            # block's values 1 ulp off the identical copy it merged)
            replace_tensor(graph.module, theta, (theta.float() + delta).to(theta.dtype))
        changed += 1
    return changed


def _block_params(graph: ModelGraph, block: Block) -> dict[str, torch.Tensor]:
    """Floating-point parameters of a block by their name relative to it ('.mlp.up_proj.weight')."""
    sub = graph.module.get_submodule(block.path)
    return {f".{name}": p for name, p in sub.named_parameters(remove_duplicate=False) if p.is_floating_point()}
