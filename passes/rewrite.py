"""Graph-rewrite helpers every pass may use: find where a target's linear computes, register new
tensors under a module path, replace a node (provenance and fake value carried over), and retire
a weight that is no longer read.

A target's linear is one of the patterns in `pm_linear` (nn.Linear's `aten.linear`, GPT-2
Conv1D's `addmm`/`mm` over an [in, out] weight); `find_sites` matches them. The precision pass
swaps the weight of each site; the adapter pass adds a path beside it; both keep the lint's
"no dangling params" and "target params exist" invariants with `register_tensors` and
`drop_weight`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import itertools

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher

from ..runtime.adapters import tag_of
from ..runtime.program import ParamInfo
from .graph import ModelGraph, Target

__all__ = ["LinearSite", "PassError", "pm_linear", "find_sites", "weight_name", "register_tensors",
           "replace_node", "set_meta", "fake_mode", "drop_weight", "weight_still_held", "has_weight", "reads", "TIED_NOTE",
           "shared_outside", "tied_storages", "release_unread"]

aten = torch.ops.aten


class PassError(RuntimeError):
    """The graph does not look as the pass expects: a bug or an unsupported model, never the policy."""


@dataclass(frozen=True)
class LinearSite:
    """One call of a target's linear: `y = x @ Wᵀ + b` (`x @ W + b` when `transposed`)."""

    node: fx.Node  # the op computing y
    x_arg: int  # where x is among node.args
    weight: fx.Node  # a get_attr
    bias: fx.Node | None
    transposed: bool  # weight stored [in, out] (Conv1D)

    @property
    def x(self) -> fx.Node:
        """Read from the node now, not when the site was found: where one linear is called twice
        in a chain, rewriting the first call changes the second's input (a stored x made the
        second quant_linear read an erased node, and the second adapter the first's base output)."""
        return self.node.args[self.x_arg]


def _match_linear(n: fx.Node) -> LinearSite | None:
    _, w, b = (list(n.args) + [None])[:3]
    return LinearSite(n, 0, w, b, False)


def _match_addmm(n: fx.Node) -> LinearSite | None:
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
        return None
    b, _, w = n.args[:3]
    return LinearSite(n, 1, w, b, True)


def _match_mm(n: fx.Node) -> LinearSite | None:
    w = n.args[1]
    return LinearSite(n, 0, w, None, True)


# (aten op, matcher): a matcher returns the site, or None for "not this pattern".
pm_linear: list[tuple[object, Callable[[fx.Node], LinearSite | None]]] = [
    (aten.linear.default, _match_linear),
    (aten.addmm.default, _match_addmm),
    (aten.mm.default, _match_mm),
]


def find_sites(graph: ModelGraph, target: Target) -> list[LinearSite]:
    """Every node of `target` that computes its linear with its own weight.

    >>> graph = capture(llama, {"input_ids": ids, "attention_mask": mask})
    >>> [s.node.name for s in find_sites(graph, graph.targets["model.layers.0.self_attn.q_proj"])]
    ['linear']
    """
    weight = graph.param(weight_name(target))
    table = dict(pm_linear)
    sites = []
    for n in target.nodes:
        match = table.get(n.target)
        # An adapter's own linears (passes/lora.py) are not the target's: they stay as stored.
        site = match(n) if match and n.op == "call_function" and tag_of(n) is None else None
        if site is not None and reads(graph, site.weight, weight):
            sites.append(site)
    if not sites:
        ops = sorted({str(n.target) for n in target.nodes if n.op == "call_function"})
        raise PassError(f"{target.path}: no linear over its weight found among its nodes ({', '.join(ops)}); "
                        "slimfx knows aten.linear, addmm and mm")
    if any(s.transposed != target.transposed for s in sites):
        raise PassError(f"{target.path} ({target.cls}): its weight is used in an unexpected layout")
    return sites


def has_weight(target: Target) -> bool:
    """Does the linear hold a float `weight` of its own? (A packed or apart-stored one does not; a
    bias may stay beside it.)"""
    return any(p.rpartition(".")[2] == "weight" for p in target.params)


def weight_name(target: Target) -> str:
    names = [p for p in target.params if p.rsplit(".", 1)[-1] == "weight"]
    if not names:
        raise PassError(f"{target.path} has no `weight` parameter (params: {target.params})")
    return names[0]


def reads(graph: ModelGraph, node, tensor: torch.Tensor) -> bool:
    """Is `node` a get_attr of exactly `tensor`?"""
    return isinstance(node, fx.Node) and node.op == "get_attr" and _attr(graph.module, node.target) is tensor


def _attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part, None)
    return module


# ---- rewriting nodes ---------------------------------------------------------------------------


def register_tensors(graph: ModelGraph, path: str, tensors: dict[str, torch.Tensor], before: fx.Node,
                     *, parameters: bool = False) -> dict[str, fx.Node]:
    """Register `tensors` on module `path` (buffers, or trainable parameters) and read each with a
    get_attr node inserted before `before`. Each goes to the device of the tensors already there:
    passes build new tensors on the CPU (seeded generators), and a model compiled on a GPU must
    keep all of its tensors there (a CPU adapter beside CUDA activations fails at the first op)."""
    gm = graph.module
    owner = gm.get_submodule(path)
    mode = fake_mode(gm)
    device = _device_of(gm, owner)
    nodes = {}
    for name, t in tensors.items():
        if hasattr(owner, name):
            raise PassError(f"{path} already has an attribute {name!r}; was it rewritten twice?")
        if device is not None and t.device != device:
            moved = t.detach().to(device)
            t = torch.nn.Parameter(moved, t.requires_grad) if isinstance(t, torch.nn.Parameter) else moved
        if parameters:
            owner.register_parameter(name, t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t))
        else:
            owner.register_buffer(name, t)
        with gm.graph.inserting_before(before):
            node = gm.graph.get_attr(f"{path}.{name}" if path else name)  # "": the root (a model that is its block list)
        node.meta["val"] = mode.from_tensor(t, static_shapes=True)
        nodes[name] = node
    return nodes


def _device_of(gm: fx.GraphModule, owner: torch.nn.Module) -> torch.device | None:
    """Where `owner`'s tensors live (its own and its submodules'), else where the model's do."""
    first = next(itertools.chain(owner.parameters(), owner.buffers(), gm.parameters(), gm.buffers()), None)
    return None if first is None else first.device


def replace_node(gm: fx.GraphModule, old: fx.Node, op, args: tuple, kwargs: dict) -> fx.Node:
    """`op(*args, **kwargs)` in place of `old`, which is erased."""
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(op, args, kwargs)
    set_meta(new, old, op, args, kwargs)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def set_meta(new: fx.Node, like: fx.Node, op, args: tuple, kwargs: dict) -> None:
    """Provenance from the node it replaces; the value from running the op's fake impl."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    fake = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
    try:
        # The Python dispatcher sends composite ops (aten.linear → matmul) through their
        # symbolic-shape decompositions, as export and dynamo do; without it, torch 2.11's C++
        # linear on a CUDA tensor of symbolic batch asks for numel() and fails (seen on an H200).
        with fake_mode(new.graph.owning_module), enable_python_dispatcher():
            new.meta["val"] = op(*fake[0], **fake[1])
    except Exception as e:
        raise PassError(f"the fake implementation of {op} failed on {new.format_node()}") from e


def fake_mode(gm: fx.GraphModule):
    """The FakeTensorMode (with its ShapeEnv) the graph was captured under."""
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in gm.graph.find_nodes(op="placeholder") if "val" in n.meta]
    mode = detect_fake_mode(vals)
    if mode is None:
        raise PassError("the graph's inputs carry no fake values (meta['val']); was it captured by slimfx?")
    return mode


# ---- retiring weights --------------------------------------------------------------------------


def drop_weight(graph: ModelGraph, target: Target, sites: list[LinearSite], added: dict[str, torch.Tensor]) -> None:
    """Delete the target's weight unless still read (tied); record `added` in the module table."""
    gm = graph.module
    name = weight_name(target)
    for node in {s.weight for s in sites}:
        if not node.users:
            gm.graph.erase_node(node)
    # get_attr nodes only, the weight looked up once: scanning every node for every target, the
    # weight looked up again per node, was 86% of a 48-block model's quantize pass
    weight = graph.param(name)
    still_read = any(_attr(gm, n.target) is weight for n in gm.graph.find_nodes(op="get_attr"))
    if not still_read:
        owner, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(owner), attr)
    info = graph.modules[target.path]
    kept = [p for p in info.params if p.name != name or still_read]
    storage = 1 + max((p.storage for m in graph.modules.values() for p in m.params), default=0)
    new = [ParamInfo(f"{target.path}.{k}", tuple(t.shape), str(t.dtype).removeprefix("torch."),
                     t.numel() * t.element_size(), storage + i, is_buffer=True)
           for i, (k, t) in enumerate(added.items())]
    graph.modules[target.path] = replace(info, params=tuple(kept + new))


def weight_still_held(graph: ModelGraph, target: Target) -> bool:
    """After a rewrite: is the original weight still on the module (tied to another reader)?"""
    info = graph.modules[target.path]
    return any(p.name == weight_name(target) for p in info.params)


def tied_storages(graph: ModelGraph, targets) -> set[int]:
    """The storages of the tied weights among `targets` (one tensor several modules read)."""
    return {p.storage for t in targets for p in graph.modules[t.path].params if p.name in t.tied}


# A rule on a linear whose weight another, unselected module shares (a tied head and embedding).
TIED_NOTE = "tied to another module's weight, which keeps the original (its memory is not freed)"


def shared_outside(graph: ModelGraph, target: Target, paths: set[str]) -> bool:
    """Does a module outside `paths` share one of `target`'s tied tensors? (When every sharer is
    selected, the rule rewrites them all and the original goes.)"""
    storages = tied_storages(graph, [target])
    return any(p.storage in storages for path, info in graph.modules.items() if path not in paths
               for p in info.params)


def release_unread(graph: ModelGraph, storages: set[int]) -> None:
    """After a precision rule rewrote its targets: a tied weight that drop_weight kept because a
    module sharing it still read it, and that no node reads any longer (each sharer has been
    rewritten, by this rule or an earlier one), leaves the graph and the module table under
    every name it had (it stayed as dead fp32 bytes, counted and saved)."""
    gm = graph.module
    for storage in storages:
        rows = [(path, p.name) for path, info in graph.modules.items() for p in info.params if p.storage == storage]
        tensors = [t for _, name in rows if isinstance(t := _attr(gm, name), torch.Tensor)]
        readers = [n for n in gm.graph.nodes if any(reads(graph, n, t) for t in tensors)]
        if not rows or any(n.users for n in readers):
            continue
        for node in readers:
            gm.graph.erase_node(node)
        for path, name in rows:
            owner, _, attr = name.rpartition(".")
            if hasattr(gm.get_submodule(owner), attr):
                delattr(gm.get_submodule(owner), attr)
            info = graph.modules[path]
            graph.modules[path] = replace(info, params=tuple(p for p in info.params if p.name != name))
