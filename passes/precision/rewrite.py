"""The precision pass's two rewrites of a target's linear sites (found by passes/rewrite.py):
`to_quant_linear` swaps each for `slimfx::quant_linear` over packed buffers registered under the
target's module path; `to_half` stores the weight in fp16/bf16 and casts it back with
`aten._to_copy`. Both delete the fp32 weight unless another module still reads it (tied).
A DoRA adapter on the target (passes/lora.py) reads the base weight for its norm: it is given the
new weight (dequantized, or cast back) too, and the adapter itself stays as it is stored.
"""
from __future__ import annotations

import torch

from ...runtime.formats import QuantizedWeight
from ...runtime.ops import quant_linear_args
from ..graph import ModelGraph, Target
from ..lora import swap_adapter_weight
from ..rewrite import LinearSite, drop_weight, register_tensors, replace_node, set_meta

__all__ = ["to_quant_linear", "to_half"]

aten = torch.ops.aten


def to_quant_linear(graph: ModelGraph, target: Target, sites: list[LinearSite], qw: QuantizedWeight) -> None:
    """Replace every site with `slimfx::quant_linear` over `qw`, stored as buffers
    `<path>.qweight`, `<path>.scales` (and `<path>.zeros` when asymmetric)."""
    tensors = {"qweight": qw.qweight, "scales": qw.scales, "zeros": qw.zeros}
    tensors = {k: v.contiguous() for k, v in tensors.items() if v is not None}
    attrs = register_tensors(graph, target.path, tensors, _first(graph, sites))
    for site in sites:
        args = (site.x, attrs["qweight"], attrs["scales"], attrs.get("zeros"), site.bias, *quant_linear_args(qw))
        replace_node(graph.module, site.node, torch.ops.slimfx.quant_linear.default, args, {})
    args = (attrs["qweight"], attrs["scales"], attrs.get("zeros"), *quant_linear_args(qw))
    swap_adapter_weight(graph, target, lambda: _call(graph, torch.ops.slimfx.dequantize.default, args))
    drop_weight(graph, target, sites, added=tensors)


def to_half(graph: ModelGraph, target: Target, sites: list[LinearSite], enc: torch.Tensor) -> None:
    """Store `enc` (the encoded [out, in] weight, fp16 or bf16) as `<path>.weight_fp16` /
    `weight_bf16` and cast it back to the input's dtype right before the linear (`aten._to_copy`):
    half the bytes, same ops. `enc`, not the graph's weight: GPTQ's sweep may have encoded the
    weight toward its drift target, which the layers after it were calibrated on."""
    gm = graph.module
    name = "weight_fp16" if enc.dtype == torch.float16 else "weight_bf16"
    stored = {name: (enc.T if target.transposed else enc).contiguous()}
    half = register_tensors(graph, target.path, stored, _first(graph, sites))[name]
    for site in sites:
        x_dtype = site.x.meta["val"].dtype
        with gm.graph.inserting_before(site.node):
            cast = gm.graph.call_function(aten._to_copy.default, (half,), {"dtype": x_dtype})
        set_meta(cast, site.node, aten._to_copy.default, (half,), {"dtype": x_dtype})
        site.node.replace_input_with(site.weight, cast)

    def dora_weight():  # float32 [out, in], as the adapter reads it
        w = _call(graph, aten._to_copy.default, (half,), {"dtype": torch.float32})
        return _call(graph, aten.t.default, (w,)) if target.transposed else w

    swap_adapter_weight(graph, target, dora_weight)
    drop_weight(graph, target, sites, added=stored)


def _call(graph: ModelGraph, op, args: tuple, kwargs: dict | None = None):
    node = graph.module.graph.call_function(op, args, kwargs or {})
    set_meta(node, node, op, args, kwargs or {})
    return node


def _first(graph: ModelGraph, sites: list[LinearSite]):
    return min(sites, key=lambda s: graph.node_order.get(s.node, 0)).node
