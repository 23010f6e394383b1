"""One form for every linear: `x @ W.T` over a module's 2-D weight (Falcon's FalconLinear computes
`hidden_states @ self.weight.T`) becomes `aten.linear(x, W)`, the op the passes match
(rewrite.pm_linear). Done once, at capture, so quantize, adapt and the codegen see one pattern.

Bitwise the same: ATen's linear without a bias is that very matmul (a bias stays the add after it).
"""
from __future__ import annotations

import torch
from torch import fx

from .rewrite import replace_node

__all__ = ["matmuls_as_linears"]

aten = torch.ops.aten

_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}


def matmuls_as_linears(gm: fx.GraphModule) -> int:
    """Rewrite in place; returns how many matmuls became linears."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.matmul.default or len(node.args) != 2:
            continue
        x, t = node.args
        weight = _transposed_weight(t)
        if weight is None or not isinstance(x, fx.Node):
            continue
        replace_node(gm, node, aten.linear.default, (x, weight), {})
        if not t.users:
            gm.graph.erase_node(t)
        count += 1
    if count:
        gm.recompile()
    return count


def _transposed_weight(t) -> fx.Node | None:
    """W where `t` is W transposed and W a module's 2-D tensor (a get_attr), else None."""
    if not isinstance(t, fx.Node) or t.op != "call_function" or t.target not in _TRANSPOSES:
        return None
    w = t.args[0]
    val = w.meta.get("val") if isinstance(w, fx.Node) else None
    if not isinstance(w, fx.Node) or w.op != "get_attr" or not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None
    if t.target is aten.transpose.int and {d % 2 for d in t.args[1:3]} != {0, 1}:
        return None
    if t.target is aten.permute.default and [d % 2 for d in t.args[1]] != [1, 0]:
        return None
    return w
