"""The float formats generated kernels read and write — float32, float16, bfloat16 — and how a
kernel's source handles them.

Every kernel computes in float32. A value read in half precision is widened as it is loaded; a
value the graph has in half precision is rounded to it where the graph makes it — after each op,
because that is what eager PyTorch does (its half-precision ops compute in float32 and round each
result), so a fused kernel computes what the unfused graph computes up to the order of sums, not
a more precise number that would drift from the eager backend by more than that. A GEMM's tiles
go into `tl.dot` in the input's own format (tensor cores on a GPU), accumulating in float32; a
dequantized weight tile is rounded to the input's format first, as `slimfx::quant_linear`'s eager
meaning casts the dequantized weight to x's dtype.

For float32 values every helper returns its expression unchanged, so float32 sources (and their
golden files and cache entries) are what they were before half precision existed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = ["FLOATS", "float_value", "tl_type", "widened", "rounded", "narrowed", "dot"]

FLOATS = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16"}


def float_value(node: Any, template: str) -> torch.Tensor:
    """The node's value, which must be a tensor of one of FLOATS (what the templates read)."""
    from .expr import Unsupported

    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise Unsupported(f"{getattr(node, 'name', node)} has no tensor value")
    if val.dtype not in FLOATS:
        raise Unsupported(f"{node.name} is {val.dtype}: the {template} template reads float32, float16 "
                          "and bfloat16 values")
    return val


def tl_type(dtype: torch.dtype) -> str:
    return FLOATS[dtype]


def widened(expr: str, dtype: torch.dtype) -> str:
    """`expr`, loaded in `dtype`, as float32."""
    return expr if dtype == torch.float32 else f"{expr}.to(tl.float32)"


def rounded(expr: str, dtype: torch.dtype) -> str:
    """`expr` (float32) rounded to `dtype` and kept in float32: a half-precision op's result."""
    return expr if dtype == torch.float32 else f"({expr}).to({FLOATS[dtype]}).to(tl.float32)"


def narrowed(expr: str, dtype: torch.dtype) -> str:
    """`expr` (float32) in `dtype`: what is stored, or what goes into a half-precision tl.dot."""
    return expr if dtype == torch.float32 else f"({expr}).to({FLOATS[dtype]})"


def dot(a: str, b: str, dtype: torch.dtype) -> str:
    """tl.dot of two tiles in `dtype`, accumulating in float32. float32 tiles multiply in IEEE
    float32 (a GPU would otherwise round them to TF32: ten bits of mantissa); half-precision tiles
    go to the tensor cores as they are."""
    return f'tl.dot({a}, {b}, input_precision="ieee")' if dtype == torch.float32 else f"tl.dot({a}, {b})"
