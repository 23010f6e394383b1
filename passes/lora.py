"""The LoRA/DoRA rewrite primitive of the graph core: add an adapter beside a target's base linear.

Every pass may use it (the adapter pass, and collapse's `heal method=lora`), so it lives here and
not in a pass folder. The base call stays its own node — `aten.linear`, GPT-2 Conv1D's
`addmm`/`mm`, or `slimfx::quant_linear` — and the adapter's nodes are added after it, each tagged
(runtime/adapters.py) as a part of the one adapter of that target:

    LoRA:  out = y + B(A(dropout(x))) · s                                       (s = alpha/rank)
    DoRA:  w = base weight [out, in];  n = detach(‖w + s·B@A‖ per row);  k = m / n
           out = y + ((k − 1) · (y − bias) + (B(A(dropout(x))) · k) · s)

which are PEFT's (peft/tuners/lora/layer.py and dora.py), so weights move between the two as they
are. With dropout > 0, DoRA's base term uses the dropped-out input, `w @ dropout(x)`, as PEFT does
in training, written `(y − bias) + w @ (dropout(x) − x)`; that correction is inserted only while
the model trains (runtime/dora_dropout.py), so eval computes PEFT's `y − bias` and no more. A
and B stored in half precision (`adapt … dtype=fp16|bf16`) are read through one `aten._to_copy` each up to the activations' dtype. On a half model DoRA's norm, k and term are
float32 (as PEFT's fp32 adapter computes them) and the term is cast to y's dtype before the add.
A later `quantize` of the target swaps the base
call and, through `swap_adapter_weight`, the weight DoRA reads; the adapter itself stays as stored.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import fx

from ..runtime import ops  # noqa: F401 - registers slimfx::quant_linear and slimfx::dequantize
from ..runtime.adapters import Adapter, tag, tag_of
from ..runtime.dora_dropout import BASE_PRODUCT
from ..runtime.program import ParamInfo
from .graph import ModelGraph, Target
from .rewrite import PassError, register_tensors, set_meta

__all__ = ["BaseSite", "base_sites", "insert_adapter", "has_adapter", "swap_adapter_weight",
           "adapter_weight_nodes", "site_dims", "base_weight"]

aten = torch.ops.aten
_BASE_OPS = {aten.linear.default: "linear", aten.addmm.default: "addmm", aten.mm.default: "mm"}


@dataclass(frozen=True)
class BaseSite:
    """One call of a target's base linear, whatever the precision pass made of it."""

    node: fx.Node  # y
    bias: fx.Node | None
    kind: str  # "linear" | "addmm" | "mm" (Conv1D) | "quant" (slimfx::quant_linear)
    weight: fx.Node | None  # the weight argument of an fp/half base (a get_attr, or a cast of one)

    @property
    def transposed(self) -> bool:
        return self.kind in ("addmm", "mm")

    @property
    def x(self) -> fx.Node:
        """Read from the node now (as rewrite.LinearSite.x): a linear called twice in a chain got
        its second adapter on the first call's base output, not on what the first adapter made."""
        return self.node.args[1 if self.kind == "addmm" else 0]


def base_sites(graph: ModelGraph, target: Target) -> list[BaseSite]:
    """Every call of `target`'s base linear (not an adapter's own linears)."""
    quant = torch.ops.slimfx.quant_linear.default
    sites = []
    for n in target.nodes:
        if n.op != "call_function" or tag_of(n) is not None:
            continue
        if n.target is quant:
            sites.append(BaseSite(n, n.args[4], "quant", None))
            continue
        kind = _BASE_OPS.get(n.target)
        if kind == "linear":
            _, w, b = (list(n.args) + [None])[:3]
        elif kind == "addmm":
            b, _, w = n.args[:3]
        elif kind == "mm":
            w, b = n.args[1], None
        else:
            continue
        if _attr_source(w) is not None:
            sites.append(BaseSite(n, b, kind, w))
    if not sites:
        ops = sorted({str(n.target) for n in target.nodes if n.op == "call_function"})
        raise PassError(f"{target.path}: no linear call found among its nodes ({', '.join(ops)}) to put an "
                        "adapter beside; slimfx knows aten.linear, addmm, mm and slimfx::quant_linear")
    return sites


def _attr_source(w) -> fx.Node | None:
    """The get_attr a weight argument reads: itself, or the input of a dtype cast (fp16/bf16 storage)."""
    if isinstance(w, fx.Node) and w.op == "call_function" and w.target is aten._to_copy.default:
        w = w.args[0]
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


def has_adapter(graph: ModelGraph, path: str) -> bool:
    """Does the linear at `path` already carry an adapter (its lora_A, from an earlier rule)?"""
    return hasattr(graph.module.get_submodule(path), "lora_A")


def insert_adapter(graph: ModelGraph, target: Target, adapter: Adapter, tensors: dict[str, torch.Tensor]) -> int:
    """Add `adapter` with parameters `tensors` (lora_A [r, in], lora_B [out, r], and for DoRA
    lora_magnitude [out]) beside every call of the target's base linear. Returns the number of
    calls adapted. The parameters are registered on the target's module and in its module table.
    The module's generated forward is left stale: the caller recompiles once after inserting them
    all (one recompile of SmolLM2's graph is ≈0.25 s: one per adapter was 40 of a 58 s compile)."""
    sites = base_sites(graph, target)
    gm = graph.module
    first = min(sites, key=lambda s: graph.node_order.get(s.node, 0)).node
    attrs = register_tensors(graph, target.path, tensors, first, parameters=True)
    for name, node in attrs.items():
        tag(node, adapter, name)
    values = _read_as(gm, attrs, sites[0].x.meta["val"].dtype, adapter, first)
    _record_params(graph, target.path, tensors)
    for site in sites:
        _build(gm, site, adapter, values)
    return len(sites)


def _read_as(gm: fx.GraphModule, attrs: dict[str, fx.Node], dtype: torch.dtype, adapter: Adapter,
             like: fx.Node) -> dict[str, fx.Node]:
    """The node each computation reads a tensor from: A and B stored in another dtype than the
    activations' (`adapt … dtype=fp16|bf16`) are read through one cast up each, tagged part
    "cast", so the adapter computes as an fp32 one whose values were rounded; DoRA's magnitude is
    read as stored (on a half model its k is computed in float32 and the term cast: _dora_term).
    Half A and B are read through a cast even in the activations' own dtype: training swaps them
    for float32 masters (runtime/train.py), which a linear on bf16 activations refused."""
    values = dict(attrs)
    for name in ("lora_A", "lora_B"):
        attr = attrs[name]
        stored = attr.meta["val"].dtype
        if stored == dtype and stored not in (torch.float16, torch.bfloat16):
            continue
        kwargs = {"dtype": dtype}
        with gm.graph.inserting_after(attr):
            cast = gm.graph.call_function(aten._to_copy.default, (attr,), kwargs)
        set_meta(cast, like, aten._to_copy.default, (attr,), kwargs)
        values[name] = tag(cast, adapter, "cast")
    return values


def _record_params(graph: ModelGraph, path: str, tensors: dict[str, torch.Tensor]) -> None:
    info = graph.modules[path]
    storage = 1 + max((p.storage for m in graph.modules.values() for p in m.params), default=0)
    new = tuple(ParamInfo(f"{path}.{k}" if path else k, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                          t.numel() * t.element_size(), storage + i) for i, (k, t) in enumerate(tensors.items()))
    graph.modules[path] = replace(info, params=info.params + new)


class _Builder:
    """Appends tagged call nodes one after another, starting right after `after`."""

    def __init__(self, gm: fx.GraphModule, after: fx.Node, adapter: Adapter):
        self.gm, self.like, self.cursor, self.adapter = gm, after, after, adapter

    def __call__(self, part: str, op, *args, **kwargs) -> fx.Node:
        with self.gm.graph.inserting_after(self.cursor):
            node = self.gm.graph.call_function(op, args, kwargs)
        set_meta(node, self.like, op, args, kwargs)
        self.cursor = node
        return tag(node, self.adapter, part)

    def attr(self, part: str, target: str, like: fx.Node) -> fx.Node:
        with self.gm.graph.inserting_after(self.cursor):
            node = self.gm.graph.get_attr(target)
        node.meta["val"] = like.meta["val"]
        if "nn_module_stack" in self.like.meta:
            node.meta["nn_module_stack"] = self.like.meta["nn_module_stack"]
        self.cursor = node
        return tag(node, self.adapter, part)


def _build(gm: fx.GraphModule, site: BaseSite, adapter: Adapter, values: dict[str, fx.Node]) -> None:
    b = _Builder(gm, site.node, adapter)
    y, s = site.node, adapter.scale
    h = b("dropout", aten.dropout.default, site.x, adapter.dropout, False) if adapter.dropout > 0 else site.x
    lora = b("B", aten.linear.default, b("A", aten.linear.default, h, values["lora_A"]), values["lora_B"])
    if adapter.method == "lora":
        out = b("out", aten.add.Tensor, y, b("scale", aten.mul.Tensor, lora, s))
    else:
        out = b("out", aten.add.Tensor, y, _dora_term(b, site, adapter, values, h, lora))
    y.replace_all_uses_with(out, delete_user_cb=lambda u: tag_of(u) is None)


def _dora_term(b: _Builder, site: BaseSite, adapter: Adapter, values: dict[str, fx.Node], h: fx.Node,
               lora: fx.Node) -> fx.Node:
    """DoRA's addition to y, in y's dtype. On a half model the norm, k and the term are computed
    in float32, as PEFT does (its fp32 adapter upcasts x and the weight), and the term is rounded
    once: the fp32 magnitude would otherwise promote the output to fp32 (unlike the base's: sdpa
    then refused q·k), and a norm rounded to half would not equal the magnitude a fresh adapter
    starts with (‖W‖ in fp32), so a fresh DoRA would move outputs."""
    y, s = site.node, adapter.scale
    dtype = y.meta["val"].dtype
    wide = torch.promote_types(dtype, torch.float32)
    w = _weight_value(b, site)
    delta = b("norm", aten.mul.Tensor, b("norm", aten.mm.default, values["lora_B"], values["lora_A"]), s)
    v = b("norm", aten.add.Tensor, _cast(b, "norm", w, wide), _cast(b, "norm", delta, wide))
    norm = b("norm", aten.linalg_vector_norm.default, v, 2, [1])
    # A row of W + s·B·A that is all zeros (OPT's and Gemma 2's padding row of a tied head) has
    # norm 0, and m/0 = 0/0 made that output NaN: divided by 1 there, k = m (0 for a fresh one),
    # and its output row stays 0 as W's does. Every other row is divided as PEFT divides it.
    nonzero = b("norm", aten.ne.Scalar, norm, 0)
    norm = b("norm", aten.where.ScalarOther, nonzero, norm, 1.0)
    k = b("norm", aten.div.Tensor, values["lora_magnitude"], b("norm", aten.detach.default, norm))
    # y − bias, PEFT's base term in eval. With dropout, training uses W·dropout(x) instead:
    # runtime/dora_dropout.py inserts that correction only while the model trains.
    base = b("dora", aten.sub.Tensor, y, site.bias) if site.bias is not None else y
    term = b(BASE_PRODUCT, aten.mul.Tensor, b("dora", aten.sub.Tensor, k, 1), base)
    term = b("dora", aten.add.Tensor, term, b("dora", aten.mul.Tensor, b("dora", aten.mul.Tensor, lora, k), s))
    return _cast(b, "dora", term, dtype)


def _cast(b: _Builder, part: str, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    """`node` in `dtype`: itself when it already is, else through one tagged cast."""
    if node.meta["val"].dtype == dtype:
        return node
    return b(part, aten._to_copy.default, node, dtype=dtype)


def _weight_value(b: _Builder, site: BaseSite) -> fx.Node:
    """The base weight as [out, in], from nodes of the adapter's own (part "weight" is the result)."""
    if site.kind == "quant":
        return b("weight", torch.ops.slimfx.dequantize.default, *site.node.args[1:4], *site.node.args[5:8])
    source = _attr_source(site.weight)
    w = b.attr("weight_read", source.target, source)
    if site.weight is not source:  # stored in half precision: the same cast the base applies
        w = b("weight_read", aten._to_copy.default, w, **site.weight.kwargs)
    if site.transposed:
        w = b("weight_read", aten.t.default, w)
    return tag(w, b.adapter, "weight")


def adapter_weight_nodes(graph: ModelGraph, target: Target) -> list[fx.Node]:
    """The nodes giving a DoRA adapter of `target` its base weight ([out, in])."""
    return [n for n in graph.module.graph.nodes
            if (t := tag_of(n)) is not None and t["target"] == target.path and t["part"] == "weight"]


def swap_adapter_weight(graph: ModelGraph, target: Target, build: Callable[[], fx.Node]) -> None:
    """After the base weight was re-stored (quantized, halved): give the target's DoRA adapter
    the new weight. `build()` makes the nodes computing it as float [out, in] (inserted where the
    old value was); the old nodes are erased, so the original weight is no longer read. The new
    weight is cast to the old one's dtype: on a half model the adapter was built for a half
    weight (DoRA's dropout path multiplies it with half activations; a float32 one was refused)."""
    gm = graph.module
    for old in adapter_weight_nodes(graph, target):
        adapter = tag_of(old)
        before = set(gm.graph.nodes)
        with gm.graph.inserting_before(old):
            new = build()
            dtype = old.meta["val"].dtype
            if new.meta["val"].dtype != dtype:
                cast = gm.graph.call_function(aten._to_copy.default, (new,), {"dtype": dtype})
                set_meta(cast, old, aten._to_copy.default, (new,), {"dtype": dtype})
                new = cast
        for n in set(gm.graph.nodes) - before:
            if "nn_module_stack" in old.meta:
                n.meta.setdefault("nn_module_stack", old.meta["nn_module_stack"])
            tag(n, Adapter.from_meta(adapter), "weight_read")
        tag(new, Adapter.from_meta(adapter), "weight")
        old.replace_all_uses_with(new)
        _erase_chain(gm, old)


def _erase_chain(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase `node` and then whichever of its inputs it leaves unused."""
    inputs = node.all_input_nodes
    gm.graph.erase_node(node)
    for n in inputs:
        if not n.users and tag_of(n) is not None:
            _erase_chain(gm, n)


def site_dims(site: BaseSite) -> tuple[int, int]:
    """(out_features, in_features) of a base call, from its traced values."""
    return int(site.node.meta["val"].shape[-1]), int(site.x.meta["val"].shape[-1])


def base_weight(graph: ModelGraph, site: BaseSite) -> torch.Tensor:
    """The base weight as float32 [out, in] (dequantized, cast back or un-transposed as stored)."""
    gm = graph.module
    if site.kind == "quant":
        qweight, scales, zeros = (_fetch(gm, a) for a in site.node.args[1:4])
        return torch.ops.slimfx.dequantize(qweight, scales, zeros, *site.node.args[5:8])
    w = _fetch(gm, _attr_source(site.weight)).detach().float()
    return w.T if site.transposed else w


def _fetch(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    if node is None:
        return None
    owner, _, attr = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)
