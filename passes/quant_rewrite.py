"""Graph rewrites of the precision pass: find where a target linear computes, and swap its weight.

A target's linear is one of the patterns in `pm_precision` (nn.Linear's `aten.linear`, GPT-2
Conv1D's `addmm`/`mm` over an [in, out] weight). `find_sites` matches them; `to_quant_linear`
replaces each with `slimfx::quant_linear` over packed buffers registered under the target's
module path; `to_half` stores the weight in fp16/bf16 and casts it back with `aten._to_copy`.
Both delete the fp32 weight unless another module still reads it (tied), and update
`graph.modules`, so the lint's "no dangling params" and "target params exist" keep holding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import fx

from ..runtime.formats import QuantizedWeight
from ..runtime.ops import quant_linear_args
from .graph import ModelGraph, ParamInfo, Target

__all__ = ["LinearSite", "PassError", "pm_precision", "find_sites", "to_quant_linear", "to_half"]

aten = torch.ops.aten


class PassError(RuntimeError):
    """The graph does not look as the pass expects: a bug or an unsupported model, never the policy."""


@dataclass(frozen=True)
class LinearSite:
    """One call of a target's linear: `y = x @ Wᵀ + b` (`x @ W + b` when `transposed`)."""

    node: fx.Node  # the op computing y
    x: fx.Node
    weight: fx.Node  # a get_attr
    bias: fx.Node | None
    transposed: bool  # weight stored [in, out] (Conv1D)


def _match_linear(n: fx.Node) -> LinearSite | None:
    x, w, b = (list(n.args) + [None])[:3]
    return LinearSite(n, x, w, b, False)


def _match_addmm(n: fx.Node) -> LinearSite | None:
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
        return None
    b, x, w = n.args[:3]
    return LinearSite(n, x, w, b, True)


def _match_mm(n: fx.Node) -> LinearSite | None:
    x, w = n.args[:2]
    return LinearSite(n, x, w, None, True)


# (aten op, matcher): a matcher returns the site, or None for "not this pattern".
pm_precision: list[tuple[object, Callable[[fx.Node], LinearSite | None]]] = [
    (aten.linear.default, _match_linear),
    (aten.addmm.default, _match_addmm),
    (aten.mm.default, _match_mm),
]


def find_sites(graph: ModelGraph, target: Target) -> list[LinearSite]:
    """Every node of `target` that computes its linear with its own weight.

    >>> [s.node.name for s in find_sites(graph, graph.targets["model.layers.0.self_attn.q_proj"])]
    ['linear']                                                    # doctest: +SKIP
    """
    weight = graph.param(weight_name(target))
    table = dict(pm_precision)
    sites = []
    for n in target.nodes:
        match = table.get(n.target)
        site = match(n) if match and n.op == "call_function" else None
        if site is not None and _reads(graph, site.weight, weight):
            sites.append(site)
    if not sites:
        ops = sorted({str(n.target) for n in target.nodes if n.op == "call_function"})
        raise PassError(f"{target.path}: no linear over its weight found among its nodes ({', '.join(ops)}); "
                        "the precision pass knows aten.linear, addmm and mm")
    if any(s.transposed != target.transposed for s in sites):
        raise PassError(f"{target.path} ({target.cls}): its weight is used in an unexpected layout")
    return sites


def weight_name(target: Target) -> str:
    names = [p for p in target.params if p.rsplit(".", 1)[-1] == "weight"]
    if not names:
        raise PassError(f"{target.path} has no `weight` parameter (params: {target.params})")
    return names[0]


def _reads(graph: ModelGraph, node, tensor: torch.Tensor) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and _attr(graph.module, node.target) is tensor


def _attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part, None)
    return module


# ---- rewrites ----------------------------------------------------------------------------------


def to_quant_linear(graph: ModelGraph, target: Target, sites: list[LinearSite], qw: QuantizedWeight) -> None:
    """Replace every site with `slimfx::quant_linear` over `qw`, stored as buffers
    `<path>.qweight`, `<path>.scales` (and `<path>.zeros` when asymmetric)."""
    gm = graph.module
    tensors = {"qweight": qw.qweight, "scales": qw.scales, "zeros": qw.zeros}
    tensors = {k: v.contiguous() for k, v in tensors.items() if v is not None}
    first = min(sites, key=lambda s: graph.node_order.get(s.node, 0)).node
    attrs = _register(graph, target.path, tensors, first)
    for site in sites:
        args = (site.x, attrs["qweight"], attrs["scales"], attrs.get("zeros"), site.bias, *quant_linear_args(qw))
        _replace(gm, site.node, torch.ops.slimfx.quant_linear.default, args, {})
    _drop_weight(graph, target, sites, added=tensors)


def to_half(graph: ModelGraph, target: Target, sites: list[LinearSite], dtype: torch.dtype) -> None:
    """Store the weight as `<path>.weight_fp16` / `weight_bf16` and cast it back to the input's
    dtype right before the linear (`aten._to_copy`): half the bytes, same ops."""
    gm = graph.module
    w = graph.param(weight_name(target)).detach()
    name = "weight_fp16" if dtype == torch.float16 else "weight_bf16"
    first = min(sites, key=lambda s: graph.node_order.get(s.node, 0)).node
    stored = {name: w.to(dtype)}
    half = _register(graph, target.path, stored, first)[name]
    for site in sites:
        x_dtype = site.x.meta["val"].dtype
        with gm.graph.inserting_before(site.node):
            cast = gm.graph.call_function(aten._to_copy.default, (half,), {"dtype": x_dtype})
        _set_meta(cast, site.node, aten._to_copy.default, (half,), {"dtype": x_dtype})
        site.node.replace_input_with(site.weight, cast)
    _drop_weight(graph, target, sites, added=stored)


def _register(graph: ModelGraph, path: str, tensors: dict[str, torch.Tensor], before: fx.Node) -> dict[str, fx.Node]:
    """Register `tensors` as buffers of module `path` and read each with a get_attr node."""
    gm = graph.module
    owner = gm.get_submodule(path)
    mode = _fake_mode(gm)
    nodes = {}
    for name, t in tensors.items():
        if hasattr(owner, name):
            raise PassError(f"{path} already has an attribute {name!r}; was it quantized twice?")
        owner.register_buffer(name, t)
        with gm.graph.inserting_before(before):
            node = gm.graph.get_attr(f"{path}.{name}")
        node.meta["val"] = mode.from_tensor(t, static_shapes=True)
        nodes[name] = node
    return nodes


def _replace(gm: fx.GraphModule, old: fx.Node, op, args: tuple, kwargs: dict) -> fx.Node:
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(op, args, kwargs)
    _set_meta(new, old, op, args, kwargs)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def _set_meta(new: fx.Node, like: fx.Node, op, args: tuple, kwargs: dict) -> None:
    """Provenance from the node it replaces; the value from running the op's fake impl."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    fake = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
    try:
        with _fake_mode(new.graph.owning_module):
            new.meta["val"] = op(*fake[0], **fake[1])
    except Exception as e:
        raise PassError(f"the fake implementation of {op} failed on {new.format_node()}") from e


def _fake_mode(gm: fx.GraphModule):
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder" and "val" in n.meta]
    mode = detect_fake_mode(vals)
    if mode is None:
        raise PassError("the graph's inputs carry no fake values (meta['val']); was it captured by slimfx?")
    return mode


def _drop_weight(graph: ModelGraph, target: Target, sites: list[LinearSite], added: dict[str, torch.Tensor]) -> None:
    """Delete the fp weight unless still read (tied); update the module table either way."""
    gm = graph.module
    name = weight_name(target)
    for node in {s.weight for s in sites}:
        if not node.users:
            gm.graph.erase_node(node)
    still_read = any(_reads(graph, n, graph.param(name)) for n in gm.graph.nodes)
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
