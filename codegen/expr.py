"""aten ops as Triton `tl` expressions (float32), for the row and GEMM templates.

`expression(node, operand)` gives the expression of a pointwise node, `operand(arg)` naming each
argument (a variable for a graph value, the literal for a Python number); `reduction_lines` the
statements of a row reduction over the masked row (`m`, `D` and `BLOCK` are the kernel's).
An op missing from the table raises Unsupported: the group is not generated, never approximated.
Expressions compute in float32 whatever the values' dtypes; `node_value` rounds a half-precision
op's result to its dtype (codegen/dtypes.py), which is also all a cast between float formats does.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from .dtypes import FLOATS, rounded

__all__ = ["Unsupported", "expression", "node_value", "reduction_lines"]

aten = torch.ops.aten


class Unsupported(ValueError):
    """A group the template cannot express; the message names the node."""


def _gelu(a, approximate="none"):
    if approximate == "tanh":
        inner = f"0.7978845608028654 * ({a} + 0.044715 * {a} * {a} * {a})"
        return f"0.5 * {a} * (1.0 + (2.0 * tl.sigmoid(2.0 * ({inner})) - 1.0))"
    return f"0.5 * {a} * (1.0 + tl.math.erf({a} * {1 / math.sqrt(2)!r}))"


def _tanh(a):
    """tanh in float32 without cancellation near 0 (`2·sigmoid(2a) - 1` and `(1 - e)/(1 + e)`
    both lose the low bits there: tanh(1e-4) was 1.7e-4 off, relatively): its odd Taylor series
    below |a| = 0.25 (the next term is under 1e-8 of the value), `(1 - e)/(1 + e)` of
    e = exp(-2|a|) with a's sign above. Triton's interpreter has no libdevice tanh."""
    series = f"{a} * (1.0 + {a} * {a} * (-0.3333333333333333 + {a} * {a} * (0.13333333333333333 + {a} * {a} * " \
             f"(-0.05396825396825397 + {a} * {a} * 0.021869488536155203))))"
    e = f"tl.exp(-2.0 * tl.abs({a}))"
    return f"tl.where(tl.abs({a}) < 0.25, {series}, tl.where({a} < 0.0, -1.0, 1.0) * (1.0 - {e}) / (1.0 + {e}))"


def _pow(a, p):
    table = {2: f"({a} * {a})", 1: a, 0.5: f"tl.sqrt({a})", -1: f"(1.0 / {a})", 3: f"({a} * {a} * {a})"}
    if p not in table:
        raise Unsupported(f"pow with exponent {p!r}")
    return table[p]


def _add(a, b, alpha=1):
    return f"({a} + {b})" if alpha == 1 else f"({a} + {alpha!r} * {b})"


def _sub(a, b, alpha=1):
    return f"({a} - {b})" if alpha == 1 else f"({a} - {alpha!r} * {b})"


def _relu(a):
    # tl.maximum drops a NaN by default (relu(nan) came out 0): torch keeps it
    return f"tl.maximum({a}, 0.0, propagate_nan=tl.PropagateNan.ALL)"


_POINTWISE = {
    aten.add.Tensor: _add, aten.add.Scalar: _add, aten.sub.Tensor: _sub, aten.sub.Scalar: _sub,
    aten.mul.Tensor: lambda a, b: f"({a} * {b})", aten.mul.Scalar: lambda a, b: f"({a} * {b})",
    aten.div.Tensor: lambda a, b: f"({a} / {b})", aten.div.Scalar: lambda a, b: f"({a} / {b})",
    aten.neg.default: lambda a: f"(-{a})", aten.relu.default: _relu,
    aten.sigmoid.default: lambda a: f"tl.sigmoid({a})", aten.silu.default: lambda a: f"({a} * tl.sigmoid({a}))",
    aten.tanh.default: _tanh, aten.exp.default: lambda a: f"tl.exp({a})",
    aten.cos.default: lambda a: f"tl.cos({a})", aten.sin.default: lambda a: f"tl.sin({a})",
    aten.rsqrt.default: lambda a: f"tl.rsqrt({a})", aten.sqrt.default: lambda a: f"tl.sqrt({a})",
    aten.pow.Tensor_Scalar: _pow, aten.gelu.default: _gelu,
}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}


def expression(node: fx.Node, operand) -> str:
    op = node.target
    if op in _CASTS:  # a cast between float formats is the rounding `node_value` adds
        val = node.meta.get("val")
        if getattr(val, "dtype", None) not in FLOATS:
            raise Unsupported(f"{node.name}: a cast to {getattr(val, 'dtype', '?')} (the templates compute "
                              "float32, float16 and bfloat16 values)")
        return operand(node.args[0])
    if op not in _POINTWISE:
        raise Unsupported(f"{node.name}: no tl expression for {op}")
    args = [_literal(operand(a)) for a in node.args]
    kwargs = {k: _literal(v) for k, v in node.kwargs.items()}
    return _POINTWISE[op](*args, **kwargs)


def _literal(value):
    """A Python number as the kernel's source writes it: inf and nan are no names there
    (`str(float("inf"))` made a kernel that raised NameError at its first call)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float('{value}')"
    return value


def node_value(node: fx.Node, operand) -> str:
    """`expression`, rounded to the node's dtype when that is a half-precision one."""
    return rounded(expression(node, operand), node.meta["val"].dtype)


def _operand_in(node: fx.Node, operand) -> str:
    """The reduced operand, first converted to the dtype the op was asked to reduce in
    (`x.sum(-1, dtype=torch.float16)`, `softmax(x, -1, dtype=…)`): eager converts, then reduces."""
    x = operand(node.args[0])
    dtype = node.kwargs.get("dtype")
    if node.target is aten.softmax.int and len(node.args) > 2:
        dtype = node.args[2]
    source = getattr(node.args[0], "meta", {}).get("val")
    if dtype is None or dtype == getattr(source, "dtype", None):
        return x
    if dtype not in FLOATS:
        raise Unsupported(f"{node.name}: a reduction in {dtype} (the templates reduce float32, float16 and "
                          "bfloat16 values)")
    return rounded(x, dtype)


def reduction_lines(node: fx.Node, var: str, operand) -> list[str]:
    """Statements leaving `var` as the row's reduced value (a per-program scalar) or, for
    softmax and layer norm, the row's normalized values — in float32, rounded once at the end to
    a half-precision result's dtype (as eager's half reductions accumulate in float32)."""
    lines = _reduction_lines(node, var, operand)
    dtype = node.meta["val"].dtype
    return lines if dtype == torch.float32 else lines + [f"    {var} = {rounded(var, dtype)}"]


def _reduction_lines(node: fx.Node, var: str, operand) -> list[str]:
    op, x = node.target, _operand_in(node, operand)
    total = f"tl.sum(tl.where(m, {x}, 0.0), axis=0)"
    if op is aten.sum.dim_IntList:
        return [f"    {var} = {total}"]
    if op is aten.mean.dim:
        return [f"    {var} = {total} / D"]
    if op is aten.amax.default:  # tl.max drops a NaN, torch.amax returns it
        return [f"    {var} = tl.max(tl.where(m, {x}, float('-inf')), axis=0)",
                f"    {var} = tl.where(tl.max(tl.where(m & ({x} != {x}), 1, 0), axis=0) > 0, float('nan'), {var})"]
    if op in (aten._softmax.default, aten.softmax.int):
        return [f"    {var}_max = tl.max(tl.where(m, {x}, float('-inf')), axis=0)",
                f"    {var}_e = tl.where(m, tl.exp({x} - {var}_max), 0.0)",
                f"    {var} = {var}_e / tl.sum({var}_e, axis=0)"]
    if op is aten.layer_norm.default:
        args = list(node.args) + [None] * (5 - len(node.args))
        weight, bias, eps = args[2], args[3], args[4] if args[4] is not None else 1e-5
        lines = [f"    {var}_mean = {total} / D",
                 f"    {var}_c = tl.where(m, {x} - {var}_mean, 0.0)",
                 f"    {var} = {var}_c * tl.rsqrt(tl.sum({var}_c * {var}_c, axis=0) / D + {eps!r})"]
        if weight is not None:
            lines.append(f"    {var} = {var} * {operand(weight)}")
        if bias is not None:
            lines.append(f"    {var} = {var} + {operand(bias)}")
        return lines
    raise Unsupported(f"{node.name}: no row reduction template for {op}")
