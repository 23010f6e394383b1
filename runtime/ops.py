"""The custom ops the passes put into the graph, in namespace `slimfx` (torch.library).

Each op has an eager reference implementation — which *is* its meaning; every generated kernel is
tested against it — and a fake implementation so torch.export can trace, save and load graphs that
call it. Importing this module registers the ops once (re-imports and reloads are no-ops).

    y = torch.ops.slimfx.quant_linear(x, qweight, scales, zeros, bias, bits, group, in_features)

is `F.linear(x, dequantize(...).to(x.dtype), bias)` for a weight packed as in runtime/formats.py;
`group` is the group size (`in_features` for per-channel). `zeros` says the zero-point kind by
its dtype: None is symmetric, uint8 [out, ceil(n_groups * bits / 8)] holds whole zero points
packed `bits` bits each, a float tensor [out, n_groups] holds them as they are (float zero points,
or the fp16 whole ones of artifacts written before zeros were packed).

    w = torch.ops.slimfx.dequantize(qweight, scales, zeros, bits, group, in_features)

is that weight as float32 [out, in]: DoRA reads it for its column norm over a quantized base.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .formats import QuantFormat, QuantizedWeight, dequantize, group_size

__all__ = ["quant_linear", "quant_linear_reference", "apply_quant_linear", "quant_linear_args", "dequantize_op",
           "check_quant_linear"]

_SCHEMA = ("(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
           "int bits, int group, int in_features) -> Tensor")


def check_quant_linear(x, qweight, scales, zeros, bits, group, in_features) -> None:
    """Shape and dtype checks shared by the eager and the fake implementation."""
    if bits not in (2, 4, 8):
        raise ValueError(f"slimfx::quant_linear: bits={bits} is not one of (2, 4, 8)")
    if group <= 0 or in_features <= 0:
        raise ValueError(f"slimfx::quant_linear: group={group} and in_features={in_features} "
                         "must be positive")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"slimfx::quant_linear: qweight must be 2-D uint8, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    if qweight.shape[1] != math.ceil(in_features * bits / 8):
        raise ValueError(f"slimfx::quant_linear: qweight has {qweight.shape[1]} bytes per row; "
                         f"{in_features} {bits}-bit codes need {math.ceil(in_features * bits / 8)}")
    groups = math.ceil(in_features / group)
    expected = (qweight.shape[0], groups)
    if tuple(scales.shape) != expected:
        raise ValueError(f"slimfx::quant_linear: scales is {tuple(scales.shape)}, expected {expected} "
                         f"(out, ceil(in_features / group))")
    if zeros is not None:
        _check_zeros(zeros, qweight.shape[0], groups, bits)
    if x.shape[-1] != in_features:
        raise ValueError(f"slimfx::quant_linear: input's last dim is {x.shape[-1]}, expected {in_features}")


def _check_zeros(zeros, out: int, groups: int, bits: int) -> None:
    if zeros.dtype == torch.uint8:
        expected, what = (out, math.ceil(groups * bits / 8)), "(out, ceil(n_groups * bits / 8)): packed whole zero points"
    elif zeros.is_floating_point():
        expected, what = (out, groups), "(out, ceil(in_features / group)): float zero points"
    else:
        raise ValueError(f"slimfx::quant_linear: zeros of dtype {zeros.dtype}; pass uint8 (packed whole "
                         "zero points) or a float tensor (float zero points)")
    if tuple(zeros.shape) != expected:
        raise ValueError(f"slimfx::quant_linear: zeros is {zeros.dtype} {tuple(zeros.shape)}, expected "
                         f"{expected} {what}")


def _weight(qweight, scales, zeros, bits, group, in_features) -> torch.Tensor:
    """float32 [out, in]: the packed weight, dequantized."""
    kind = "float" if zeros is not None and zeros.is_floating_point() else "int"
    fmt = QuantFormat(bits, group, zeros is None, kind)
    return dequantize(QuantizedWeight(qweight, scales, zeros, fmt, (qweight.shape[0], in_features)))


def quant_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
                           group: int, in_features: int) -> torch.Tensor:
    """Eager meaning of `slimfx::quant_linear`: dequantize, then `F.linear` in x's dtype."""
    check_quant_linear(x, qweight, scales, zeros, bits, group, in_features)
    w = _weight(qweight, scales, zeros, bits, group, in_features).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _fake(x, qweight, scales, zeros, bias, bits, group, in_features):
    check_quant_linear(x, qweight, scales, zeros, bits, group, in_features)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# Gradients flow to x and bias only (adapters train on a frozen quantized base, as in QLoRA).
def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, group, in_features = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.args = (bits, group, in_features)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _weight(qweight, scales, zeros, *ctx.args).to(grad.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None, None


_DEQUANT_SCHEMA = "(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group, int in_features) -> Tensor"


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                         bits: int, group: int, in_features: int) -> torch.Tensor:
    """Eager meaning of `slimfx::dequantize`: the packed weight as float32 [out, in]."""
    check_quant_linear(qweight.new_empty((0, in_features), dtype=torch.float32), qweight, scales, zeros, bits, group,
           in_features)
    return _weight(qweight, scales, zeros, bits, group, in_features)


def _dequantize_fake(qweight, scales, zeros, bits, group, in_features):
    check_quant_linear(qweight.new_empty((0, in_features), dtype=torch.float32), qweight, scales, zeros, bits, group,
           in_features)
    return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.float32)


def _register() -> None:
    # hasattr answers False until the schema exists; a second import (a reload, or the checkout
    # imported under another name) finds it and leaves the first registration in place.
    if not hasattr(torch.ops.slimfx, "quant_linear"):
        op = torch.library.custom_op("slimfx::quant_linear", quant_linear_reference, mutates_args=(),
                                     schema=_SCHEMA)
        op.register_fake(_fake)
        op.register_autograd(_backward, setup_context=_setup_context)
    if not hasattr(torch.ops.slimfx, "dequantize"):
        # No autograd: the packed codes are frozen and DoRA detaches the norm it reads them for.
        op = torch.library.custom_op("slimfx::dequantize", dequantize_reference, mutates_args=(),
                                     schema=_DEQUANT_SCHEMA)
        op.register_fake(_dequantize_fake)


_register()
# One import registers every slimfx:: op (artifact loading imports this module only).
from . import token_ops  # noqa: E402,F401 - slimfx::token_index, pack_tokens, unpack_tokens, packed_attention
from . import autocast_ops  # noqa: E402,F401 - slimfx::matmul_without_autocast

quant_linear = torch.ops.slimfx.quant_linear
dequantize_op = torch.ops.slimfx.dequantize


def quant_linear_args(qw: QuantizedWeight) -> tuple[int, int, int]:
    """The op's int arguments for a packed weight: (bits, group, in_features)."""
    return qw.fmt.bits, group_size(qw.fmt, qw.in_features), qw.in_features


def apply_quant_linear(x: torch.Tensor, qw: QuantizedWeight,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Call the op on a `QuantizedWeight`: `apply_quant_linear(x, quantize_rtn(w, fmt), b)`."""
    return quant_linear(x, qw.qweight, qw.scales, qw.zeros, bias, *quant_linear_args(qw))