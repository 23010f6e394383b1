"""What each graph op is to the code generator: free (a view or bookkeeping, no kernel), pointwise,
a row reduction (over the last dim), a GEMM anchor, or opaque (a kernel of its own, never fused).

Read from the op itself (torch's `pointwise` tag, the dims an op reduces), never from module names.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..runtime import ops as slimfx_ops  # registers slimfx::quant_linear and slimfx::dequantize

__all__ = ["kind_of", "is_free", "keeps_order", "ANCHORS", "PROLOGUES"]

aten = torch.ops.aten

# Views and bookkeeping: no kernel and no memory traffic of their own.
_FREE = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.transpose.int,
    aten.permute.default, aten.t.default, aten.alias.default, aten.detach.default, aten.slice.Tensor,
    aten.select.int, aten.sym_size.int, aten._assert_tensor_metadata.default, aten.lift_fresh_copy.default,
    aten.dropout.default, operator.getitem,
}
# Free ops after which element i of the row-major result is element i of the input (or of its
# broadcast): the templates index a group's values by their own logical shape, so only these may
# sit between two of its ops. A transpose or a slice in a group is refused, never miscomputed.
_ORDER_KEEPING = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.alias.default,
    aten.detach.default, aten.dropout.default, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
    aten.to.device,
}
# Conversions are pointwise (a cast of each element); aten tags them as nothing.
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default}
_SAME_VALUE_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default)
_ROW_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
                   aten.var.correction, aten._softmax.default, aten.softmax.int, aten._log_softmax.default,
                   aten.log_softmax.int}
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
ANCHORS = {aten.linear.default, aten.mm.default, aten.addmm.default, slimfx_ops.quant_linear.default}
PROLOGUES = {slimfx_ops.dequantize_op.default}


def is_free(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _FREE:
        return True
    # A cast to the dtype the value already has is a no-op (export writes many of them).
    # to.device / to.dtype_layout too (Llama's `inv_freq.to(device)` was left to eager ops as "no tl
    # expression for aten.to.device", GPT-2's position ids got a copy kernel)
    if node.target in _SAME_VALUE_CASTS and _same_dtype(node):
        return True
    return False


def keeps_order(node: fx.Node) -> bool:
    """A free node the templates may read through (see _ORDER_KEEPING)."""
    return node.target in _ORDER_KEEPING


def kind_of(node: fx.Node) -> str:
    """"free", "pointwise", "reduction" (one row reduction over the last dim), "anchor",
    "prologue" or "opaque"."""
    if node.op != "call_function":
        # A called submodule is a kernel of its own, except export's input-guard check
        # (`_guards_fn`), whose result nothing reads.
        return "opaque" if node.op == "call_module" and node.users else "free"
    if is_free(node):
        return "free"
    op = node.target
    if (op in ANCHORS and (op is not aten.linear.default or _rank(node.args[1]) == 2)) \
            or (op is aten.matmul.default and _rank(node.args[1]) == 2):
        # a matmul by a 2-D weight is a GEMM; a batched one (attention) is opaque, and so is a
        # linear by a 1-D weight (`[M, K] · [K] → [M]`: the template read a column stride it lacks)
        return "anchor"
    if op in PROLOGUES:
        return "prologue"
    if op in _CASTS or torch.Tag.pointwise in getattr(op, "tags", ()):
        return "pointwise" if _tensor_out(node) else "opaque"
    if (op in _NORMS and _normalizes_last_dim_only(node)) or (op in _ROW_REDUCTIONS and _last_dim_only(node)):
        return "reduction"
    return "opaque"


def _same_dtype(node: fx.Node) -> bool:
    src, out = node.args[0], node.meta.get("val")
    val = src.meta.get("val") if isinstance(src, fx.Node) else None
    return isinstance(val, torch.Tensor) and isinstance(out, torch.Tensor) and val.dtype == out.dtype \
        and val.device == out.device


def _rank(value) -> int | None:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _tensor_out(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _normalizes_last_dim_only(node: fx.Node) -> bool:
    """A norm over the last dim alone (`normalized_shape` of one dim): nn.LayerNorm([4, 16])
    normalizes two, which the row template's one-row statistics would get wrong."""
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    return isinstance(shape, (list, tuple)) and len(shape) == 1


def _last_dim_only(node: fx.Node) -> bool:
    """The op reduces (or normalizes) the last dim and nothing else: a row reduction."""
    x = node.args[0]
    rank = x.meta["val"].dim() if isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor) else None
    if not rank:  # a 0-d tensor has no row to reduce (softmax of a scalar: `d % 0` raised)
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % rank for d in dims] == [rank - 1]
