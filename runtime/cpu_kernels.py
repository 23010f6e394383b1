"""PyTorch's CPU kernels for packed weights, fed from slimfx's formats (runtime/formats.py).

`slimfx::quant_linear` (runtime/ops.py) is the meaning of a quantized linear; it dequantizes the
whole weight on every call. runtime/lower.py swaps it, once per CompiledModel, for one of the ops
here, whose weights were converted once by the `*_weights` functions below:

    slimfx::quant_linear_int4pack  int4 (and int2) codes through aten._weight_int4pack_mm_for_cpu
    slimfx::quant_linear_int8pack  per-channel int8 codes through aten._weight_int8pack_mm

Both take the reference op's eight arguments first, then the converted tensors. Activations pass
through **bf16** (x is cast to bf16, the kernel accumulates in fp32, the result is cast back to
x's dtype, then the bias is added in x's dtype): those kernels are fast only with bf16
activations (fp32 ones take a path ~10-100x slower), and the scales go to bf16 too, so results
match the reference within bf16 rounding, not bit for bit. They call the reference op instead
when a gradient is wanted (grad mode on and x or the bias requires grad: QLoRA training keeps its
exact fp32 forward and its backward) or x is not on the CPU.

The ops are CompositeImplicitAutograd: they run above autograd, where that choice can be made,
and trace (fake tensors, torch.compile) through the aten kernels' own meta functions.

Eligibility was measured on torch 2.13 (AVX512): the int4 kernel takes groups of 32/64/128/256
with K divisible by the group and N divisible by 16; a slimfx group that is a multiple of such a
kernel group (per-channel, ragged g128 at K=576, …) is expressed exactly by repeating its scale.
`aten._weight_int8pack_mm` gives wrong results (or crashes) unless K is a multiple of 16; 32 is
required here. Anything else, or a torch without the ops, keeps the reference.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import ops  # noqa: F401 - registers slimfx::quant_linear, the reference
from .formats import unpack, zero_points

__all__ = ["int4_kernel_group", "int4pack_weights", "int8_eligible", "int8pack_weights",
           "has_int4pack", "has_int8pack"]

aten = torch.ops.aten
COMPUTE_DTYPE = torch.bfloat16
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
INT8_K_MULTIPLE = 32

_REF_ARGS = ("Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
             "int group, int in_features")
_SCHEMAS = {
    "quant_linear_int4pack": f"({_REF_ARGS}, Tensor packed, Tensor scales_zeros, int kernel_group) -> Tensor",
    "quant_linear_int8pack": f"({_REF_ARGS}, Tensor weight_int8, Tensor channel_scales, "
                             "Tensor? channel_offsets) -> Tensor",
}


@functools.cache
def has_int4pack() -> bool:
    """The int4 ops exist and mean here what they meant on torch 2.13 (checked once, on 16x64)."""
    if not (hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")):
        return False
    codes = torch.arange(16 * 64, dtype=torch.int32).reshape(16, 64) % 16
    sz = torch.stack([torch.full((2, 16), 0.5), torch.full((2, 16), 1.0)], dim=-1)  # [K/32, N, 2]
    try:
        packed = aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        w = aten._weight_int4pack_mm_for_cpu(torch.eye(64, dtype=COMPUTE_DTYPE), packed, 32,
                                             sz.to(COMPUTE_DTYPE)).t().float()
    except RuntimeError:
        return False
    return torch.equal(w, (codes.float() - 8) * 0.5 + 1.0)


@functools.cache
def has_int8pack() -> bool:
    """aten._weight_int8pack_mm exists and computes x @ (w * scale).T here (checked once)."""
    if not hasattr(aten, "_weight_int8pack_mm"):
        return False
    w = (torch.arange(16 * 64).reshape(16, 64) % 256 - 128).to(torch.int8)
    try:
        out = aten._weight_int8pack_mm(torch.eye(64, dtype=COMPUTE_DTYPE), w,
                                       torch.full((16,), 0.5, dtype=COMPUTE_DTYPE)).t().float()
    except RuntimeError:
        return False
    return torch.equal(out, w.float() * 0.5)


# ---- eligibility and one-time conversion ---------------------------------------------------------


def int4_kernel_group(bits: int, group: int, in_features: int, out_features: int) -> Optional[int]:
    """The kernel's group size for an int4 or int2 weight, or None when the kernel cannot take it.
    Every slimfx group boundary (multiples of `group`, and `in_features`) must be a kernel group
    boundary, so the kernel group divides both."""
    if bits not in (2, 4) or not has_int4pack() or out_features % 16 or in_features % 2:
        return None
    return next((g for g in INT4_KERNEL_GROUPS if group % g == 0 and in_features % g == 0), None)


def int4pack_weights(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                     bits: int, group: int, in_features: int, kernel_group: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2] in the CPU kernel's layout, scales_zeros bf16 [K/kernel_group, N, 2]).

    The kernel computes (q - 8) * scale + zero with 4-bit q. Each group's zero point z (packed,
    float, or the middle code) is split into a whole part r moved into the codes, q = u + 8 - r,
    and the rest, zero = scale * (r - z), which goes through bf16: (u - z) * scale either way.
    r is as near z as keeps q in 0..15 for every code u: int4 (u up to 15) has only r = 8, so an
    asymmetric group's bf16 zero is off by ≤ 2^-9 of |8 - z| * scale (for a float zero far from
    0 that is bf16's own rounding of the group's offset, as a bf16 weight would have); int2 (u up
    to 3) takes r = round(z) in -4..8, so whole zero points give zero = 0 and the weight is exact
    up to its bf16 scale."""
    codes = unpack(qweight, bits, in_features).to(torch.int32)
    groups = scales.shape[1]
    z = zero_points(zeros, bits, groups)
    if z is None:
        z = torch.full_like(scales, float(1 << (bits - 1)), dtype=torch.float32)
    r = z.round().clamp((1 << bits) - 1 - 7, 8)
    shift = (8 - r).to(torch.int32).repeat_interleave(group, dim=1)[:, :in_features]
    owner = torch.arange(in_features // kernel_group) * kernel_group // group  # slimfx group of each
    scale = scales.float()[:, owner]
    zero = scale * (r - z)[:, owner]
    packed = aten._convert_weight_to_int4pack_for_cpu((codes + shift).contiguous(), 1)
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(COMPUTE_DTYPE).contiguous()
    return packed, scales_zeros


def int8_eligible(bits: int, group: int, in_features: int) -> bool:
    """Per-channel int8 only (the kernel has one scale per output row)."""
    return (bits == 8 and group == in_features and in_features % INT8_K_MULTIPLE == 0
            and has_int8pack())


def int8pack_weights(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(int8 codes u - 128 [N, K], bf16 scales [N], fp32 offsets [N] or None).

    (u - z) * s = (u - 128) * s + (128 - z) * s: an asymmetric weight (whole or float zero point)
    adds sum(x) * offset."""
    weight = (qweight.to(torch.int16) - 128).to(torch.int8).contiguous()
    scale = scales.float()[:, 0]
    z = zero_points(zeros, 8, 1)
    offsets = None if z is None else ((128.0 - z[:, 0]) * scale).contiguous()
    return weight, scale.to(COMPUTE_DTYPE).contiguous(), offsets


# ---- the ops ---------------------------------------------------------------------------------------


def _use_reference(x: torch.Tensor, bias: Optional[torch.Tensor], kernel_weight: torch.Tensor) -> bool:
    wants_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad))
    return wants_grad or not (x.is_cpu and kernel_weight.is_cpu)


def _reference(x, qweight, scales, zeros, bias, bits, group, in_features):
    return torch.ops.slimfx.quant_linear(x, qweight, scales, zeros, bias, bits, group, in_features)


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x as a contiguous bf16 [rows, in_features] matrix (the kernels take 2-D, contiguous A)."""
    return x.reshape(-1, in_features).to(COMPUTE_DTYPE).contiguous()


def _finish(y: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])  # a new tensor unless x is bf16: the kernel's
    return y if bias is None else y.add_(bias)


def quant_linear_int4pack(x, qweight, scales, zeros, bias, bits: int, group: int, in_features: int,
                          packed, scales_zeros, kernel_group: int):
    """`slimfx::quant_linear` through the CPU int4 kernel, bf16 activations."""
    if _use_reference(x, bias, packed) or x.shape[-1] != in_features:  # the reference says what is wrong
        return _reference(x, qweight, scales, zeros, bias, bits, group, in_features)
    sz = scales_zeros if scales_zeros.dtype == COMPUTE_DTYPE else scales_zeros.to(COMPUTE_DTYPE)
    y = aten._weight_int4pack_mm_for_cpu.default(_rows(x, in_features), packed, kernel_group, sz)
    return _finish(y, x, bias)


def quant_linear_int8pack(x, qweight, scales, zeros, bias, bits: int, group: int, in_features: int,
                          weight_int8, channel_scales, channel_offsets):
    """`slimfx::quant_linear` (per-channel int8) through aten._weight_int8pack_mm, bf16 activations."""
    if _use_reference(x, bias, weight_int8) or x.shape[-1] != in_features:
        return _reference(x, qweight, scales, zeros, bias, bits, group, in_features)
    rows = _rows(x, in_features)
    s = channel_scales if channel_scales.dtype == COMPUTE_DTYPE else channel_scales.to(COMPUTE_DTYPE)
    y = aten._weight_int8pack_mm.default(rows, weight_int8, s)
    if channel_offsets is not None:
        y = y.float() + rows.float().sum(-1, keepdim=True) * channel_offsets.float()
    return _finish(y, x, bias)


_LIB: Optional[torch.library.Library] = None


def _register() -> None:
    # A second import (a reload, or the checkout imported under another name) finds the ops.
    global _LIB
    todo = [name for name in _SCHEMAS if not hasattr(torch.ops.slimfx, name)]
    if not todo:
        return
    _LIB = torch.library.Library("slimfx", "FRAGMENT")
    impls = {"quant_linear_int4pack": quant_linear_int4pack, "quant_linear_int8pack": quant_linear_int8pack}
    for name in todo:
        _LIB.define(name + _SCHEMAS[name])
        _LIB.impl(name, impls[name], "CompositeImplicitAutograd")


_register()
