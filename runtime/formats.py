"""Packed weight formats for the precision pass: group-wise int8 / int4 / int2 codes with fp16 scales.

passes/precision/ quantizes a Linear weight into a `QuantizedWeight` (RTN here, GPTQ in
passes/precision/gptq.py); runtime/ops.py's `slimfx::quant_linear` reads the packed tensors back.

Layout (what `dequantize` and the kernels agree on):
- Groups run along the input dim: columns `[k*group, (k+1)*group)`; the last group may be shorter
  (ragged: 576 inputs at group 128 is 4 groups of 128 and one of 64). `group=None` is one group
  per output row (per channel).
- Codes are stored unsigned, `u in [0, 2^bits - 1]`, and dequantize as `(u - zero) * scale`.
  Symmetric: `zero = 2^(bits-1)` (implicit, `zeros is None`), signed codes -2^(bits-1)..2^(bits-1)-1
  and `scale = max|w| / (2^(bits-1) - 1/2)`: the grid's ends sit within scale/2 of -max|w| and
  +max|w|, so every code is used (int2 gets 4 levels, not the 3 of `max|w| / (2^(bits-1) - 1)`,
  which halves its error) and the RTN bound below still holds.
  Asymmetric, `zero="int"`: the group range is widened to include 0 (so a 0 weight is exact and
  the zero point is a whole code in [0, 2^bits - 1]), `scale = (max - min) / (2^bits - 1)`,
  `zero = round(-min / scale)`, stored packed like the codes, `bits` bits per zero point along the
  group axis: uint8 [out, ceil(n_groups * bits / 8)] (int4 g32 costs 4 + 16/32 + 4/32 = 4.625 bits).
  Asymmetric, `zero="float"` (llama.cpp's Q4_1, HQQ: ŵ = u * scale + m with a float offset m): the
  range is the group's own [min, max], not widened, and the same formula holds with a non-integer
  zero point z = -min / scale, stored fp16 [out, n_groups]. z is rounded to fp16 *before* the codes
  are chosen, so the grid the codes were rounded on is the grid that is stored. fp16 holds every z
  with |z| <= 2048 within 1/2 (whole numbers up to 2048 are exact), so the scale is widened where
  needed to keep |z| <= 2048 (a group lying more than 2048 steps from 0: its offset would otherwise
  be off by a step or more, or overflow fp16), and RTN's bound below holds for float zeros too.
  The op tells the two apart by dtype: uint8 zeros are packed whole zero points, a float tensor
  holds zero points as they are (float zeros; artifacts written before zero points were packed
  stored whole ones as fp16, which read the same way and compute the same weight).
- Scales are rounded *up* to fp16, so every weight lies within half a step of the grid and RTN
  keeps |w - ŵ| <= scale / 2 with the stored scale (up to float32 rounding of the non-integer
  (u - z) for float zeros). All-zero groups get scale 1 (ŵ = 0).
- Packing: per row, `8 // bits` codes per byte, little-end first (code j of a byte sits in bits
  [j*bits, (j+1)*bits)); each row is padded with zero codes to a whole byte.
  `qweight` is uint8 [out, ceil(in * bits / 8)].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "OutOfRange", "NotFinite", "QuantFormat", "QuantizedWeight", "from_rule", "pack", "unpack", "group_params", "quantize_codes",
    "dequantize_codes", "quantize_rtn", "dequantize", "dequantize_groups", "per_column", "error_bound", "nbytes",
    "bits_per_weight", "group_size", "n_groups", "ZEROS", "FLOAT_ZERO_MAX", "store_zeros", "zero_points",
]

BITS = (2, 4, 8)
_FORMAT_BITS = {"int8": 8, "int4": 4, "int2": 2}
# dsl/schema.py's DEFAULT_GROUP (the checker reads it there, without torch; a saved model loads
# without the compiler, so this copy is the runtime's own: tests/runtime/test_formats.py ties them)
DEFAULT_GROUP = {"int8": None, "int4": 64, "int2": 64}
_FP16_MAX = torch.finfo(torch.float16).max
ZEROS = ("int", "float")  # whole zero points (packed) or float offsets (fp16)
# fp16 holds every number up to 2048 within 1/2: the largest float zero point (module docstring).
FLOAT_ZERO_MAX = 2048.0


@dataclass(frozen=True)
class QuantFormat:
    """`QuantFormat(4, 64, True)`: int4, 64 weights per group along the input dim, symmetric.
    `QuantFormat(4, 32, False, "float")`: asymmetric with a float offset per group (Q4_1-like)."""

    bits: int
    group: int | None = None
    sym: bool = True
    zero: str = "int"

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; use one of {BITS}")
        if self.group is not None and (isinstance(self.group, bool) or not isinstance(self.group, int)
                                       or self.group <= 0):
            raise ValueError(f"group={self.group!r} must be a positive integer, or None for per-channel")
        if not isinstance(self.sym, bool):
            raise ValueError(f"sym={self.sym!r} must be True or False")
        if self.zero not in ZEROS:
            raise ValueError(f"zero={self.zero!r} is not a zero-point kind; use one of {ZEROS}")
        if self.zero == "float" and self.sym:
            raise ValueError("zero='float' is an asymmetric format (a float offset per group); "
                             "pass sym=False with it")

    @property
    def qmax(self) -> int:
        """Largest unsigned code."""
        return (1 << self.bits) - 1


def from_rule(fmt: str, group: int | None = None, sym: bool = True, zero: str = "int") -> QuantFormat:
    """The format a policy names: `from_rule("int4")` is int4 group 64 symmetric; int8 defaults
    to per-channel."""
    if fmt not in _FORMAT_BITS:
        raise ValueError(f"{fmt!r} is not a packed integer format; use one of {sorted(_FORMAT_BITS)}")
    return QuantFormat(_FORMAT_BITS[fmt], DEFAULT_GROUP[fmt] if group is None else group, sym, zero)


@dataclass(frozen=True)
class QuantizedWeight:
    """A packed [out, in] weight: `qweight` uint8 codes, `scales` fp16 [out, n_groups], `zeros`
    None (symmetric), packed uint8 [out, ceil(n_groups * bits / 8)] (whole zero points) or fp16
    [out, n_groups] (float zero points)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: QuantFormat
    shape: tuple[int, int]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]


def group_size(fmt: QuantFormat, in_features: int) -> int:
    """Columns per group; per-channel is one group spanning the whole row."""
    return in_features if fmt.group is None else min(fmt.group, in_features)


def n_groups(fmt: QuantFormat, in_features: int) -> int:
    return math.ceil(in_features / group_size(fmt, in_features))


# ---- packing ---------------------------------------------------------------------------------

def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {BITS}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [out, in] (each < 2^bits) -> uint8 [out, ceil(in * bits / 8)].

    >>> pack(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4)  # 0x21, then 0x03 padded
    tensor([[33,  3]], dtype=torch.uint8)
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack wants a 2-D uint8 tensor of codes, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code is {int(codes.max())}, which does not fit in {bits} bits")
    per = 8 // bits
    out, cols = codes.shape
    padded = torch.nn.functional.pad(codes, (0, -cols % per))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    # The shifted fields never overlap, so their sum is their bitwise or.
    return (padded.view(out, -1, per) << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [out, ceil(in * bits / 8)] -> uint8 codes [out, in_features]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack wants a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != math.ceil(in_features * bits / 8):
        raise ValueError(f"{packed.shape[1]} bytes per row cannot hold {in_features} {bits}-bit codes; "
                         f"expected {math.ceil(in_features * bits / 8)}")
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :in_features]


# ---- scales and codes ------------------------------------------------------------------------

class OutOfRange(ValueError):
    """A weight too large for the format: fp16 storage, or a group's fp16 scale."""


class NotFinite(ValueError):
    """A NaN or inf in a weight, or in the calibration statistics of its inputs."""


def _fp16_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales up to the next fp16 value, returned as float32, so that
    dividing by the stored scale never pushes a weight past the code range."""
    if bool((scale > _FP16_MAX).any()):
        raise OutOfRange(f"a weight group needs a scale above {_FP16_MAX:g} (fp16's largest); "
                         "this weight is too large to quantize with fp16 scales")
    half = scale.to(torch.float16)
    low = half.float() < scale
    half = torch.where(low, torch.nextafter(half, torch.full_like(half, math.inf)), half)
    return half.float()


def group_params(w: torch.Tensor, fmt: QuantFormat, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of each group, reducing over the last dim of `w`.

    Returns float32 tensors shaped like `w` minus its last dim: the scale (exactly an fp16 value)
    and, when asymmetric, the zero point (a whole code, or for `zero="float"` exactly an fp16
    value), else None. `shrink` < 1 narrows the range to that fraction of the group's (a clipping
    search tries several; weights outside then clamp to the end codes and the RTN bound below no
    longer holds for them).
    """
    w = w.float()
    if fmt.sym:
        scale = w.abs().amax(-1) * shrink / ((1 << (fmt.bits - 1)) - 0.5)  # see the module docstring
        return _fp16_ceil(torch.where(scale > 0, scale, 1.0)), None
    if fmt.zero == "float":
        return _float_zero_params(w, fmt, shrink)
    lo, hi = w.amin(-1).clamp(max=0) * shrink, w.amax(-1).clamp(min=0) * shrink  # the range always holds 0
    scale = _fp16_ceil(torch.where(hi > lo, (hi - lo) / fmt.qmax, 1.0))
    zero = torch.round(-lo / scale).clamp(0, fmt.qmax)
    return scale, zero


def _float_zero_params(w: torch.Tensor, fmt: QuantFormat, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`zero="float"`: the group's own range (0 need not be in it), shrunk about its middle, since
    shrinking towards 0 would move a group that lies away from 0 off its weights.

    float64, so that a group whose ends are fp16 values u*d + m (a dequantized Q4_1 file) gets
    back exactly d = (max - min) / qmax when its codes span 0..qmax: float32 would round the
    difference and the fp16 scale would then come out one step too large."""
    lo, hi = w.double().amin(-1), w.double().amax(-1)
    cut = (hi - lo) * (1 - shrink) / 2  # 0 at shrink 1: the range as it is, exactly
    lo, hi = lo + cut, hi - cut
    # Widened where needed so |z| <= 2048, which fp16 holds within 1/2 (module docstring).
    scale = torch.maximum((hi - lo) / fmt.qmax, lo.abs() / FLOAT_ZERO_MAX)
    scale = _fp16_ceil(torch.where(scale > 0, scale, 1.0))
    # Rounded to fp16 now: the codes are chosen on the grid that will be stored.
    zero = (-lo / scale.double()).to(torch.float16).float()
    return scale, zero


def _zero_or_mid(zero: torch.Tensor | None, fmt: QuantFormat) -> torch.Tensor | float:
    return float(1 << (fmt.bits - 1)) if zero is None else zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   fmt: QuantFormat) -> torch.Tensor:
    """Unsigned uint8 codes of `w` given its (broadcastable) scale and zero point; clamps to the
    code range (GPTQ's updated weights may leave the range their group started with)."""
    if fmt.zero == "float" and zero is not None:
        # A float zero point shifts the grid by a fraction of a step: round after adding it
        # (float64, so the sum does not move a weight across a rounding boundary).
        q = torch.round(w.double() / scale + zero)
    else:
        q = torch.round(w.float() / scale) + _zero_or_mid(zero, fmt)
    return q.clamp(0, fmt.qmax).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     fmt: QuantFormat) -> torch.Tensor:
    """(codes - zero) * scale in float32; exact for whole zero points, since codes are small ints
    and scales fp16 (a float zero point's difference may round in its last bit)."""
    return (codes.float() - _zero_or_mid(zero, fmt)) * scale


# ---- round to nearest ------------------------------------------------------------------------

def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got {getattr(w, 'shape', type(w))}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}; dequantize it first")
    if w.numel() == 0:
        raise ValueError(f"weight of shape {tuple(w.shape)} is empty; nothing to quantize")
    if not bool(torch.isfinite(w).all()):
        raise NotFinite("its weight holds NaN or inf; fix the model's weights before quantizing")


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, g], padding the ragged last group with copies of its last
    column. A copy of a group's own weight never moves its range: not its max|w|, and not the
    [min, max] of a float zero point's range, which padding with zeros would widen to hold 0."""
    out, cols = w.shape
    pad = -cols % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.reshape(out, -1, g)


def per_column(t: torch.Tensor, g: int, in_features: int) -> torch.Tensor:
    """Per-group [out, n_groups] -> per-column [out, in]."""
    return t.repeat_interleave(g, dim=1)[:, :in_features]


def store_zeros(zero: torch.Tensor | None, fmt: QuantFormat) -> torch.Tensor | None:
    """Zero points [out, n_groups] (float32, as `group_params` gives them) as stored: packed
    `bits`-bit codes for whole zero points, fp16 for float ones, None when symmetric."""
    if zero is None:
        return None
    if fmt.zero == "float":
        return zero.to(torch.float16).contiguous()
    return pack(zero.round().clamp(0, fmt.qmax).to(torch.uint8), fmt.bits)


def zero_points(zeros: torch.Tensor | None, bits: int, groups: int) -> torch.Tensor | None:
    """Stored zero points -> float32 [out, groups] (None stays None). uint8 are packed whole zero
    points; a float tensor holds them as they are (float zeros, and the fp16 whole zero points of
    artifacts written before zeros were packed: the same formula reads both)."""
    if zeros is None:
        return None
    if zeros.dtype == torch.uint8:
        return unpack(zeros, bits, groups).float()
    if zeros.is_floating_point():
        return zeros.float()
    raise ValueError(f"zero points of dtype {zeros.dtype} are neither packed (uint8) nor float; "
                     "re-quantize the weight with this version of slimfx")


def _packed(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
            fmt: QuantFormat) -> QuantizedWeight:
    return QuantizedWeight(pack(codes, fmt.bits), scale.to(torch.float16).contiguous(), store_zeros(zero, fmt),
                           fmt, tuple(codes.shape))


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat, params=None) -> QuantizedWeight:
    """Round-to-nearest, group by group. `params(groups [out, n, g]) -> (scale, zero)` replaces
    `group_params` (the precision pass's clipping search passes one).

    >>> qw = quantize_rtn(torch.randn(8, 100), QuantFormat(4, 32, True))
    >>> qw.qweight.shape, qw.scales.shape  # 100 = 3 groups of 32 + one of 4
    (torch.Size([8, 50]), torch.Size([8, 4]))
    """
    _check_weight(w)
    out, cols = w.shape
    g = group_size(fmt, cols)
    grouped = _grouped(w.float(), g)
    scale, zero = group_params(grouped, fmt) if params is None else params(grouped)
    codes = quantize_codes(grouped, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), fmt)
    return _packed(codes.view(out, -1)[:, :cols], scale, zero, fmt)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """float32 [out, in]."""
    cols = qw.in_features
    codes = unpack(qw.qweight, qw.fmt.bits, cols)
    return dequantize_groups(codes, qw.scales.float(), zero_points(qw.zeros, qw.fmt.bits, n_groups(qw.fmt, cols)),
                             qw.fmt)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      fmt: QuantFormat) -> torch.Tensor:
    """ŵ [out, in] from unpacked codes [out, in] and per-group scales and zero points [out, n_groups]
    (zero points as numbers, not as stored; None when symmetric)."""
    cols = codes.shape[1]
    g = group_size(fmt, cols)
    zero = None if zeros is None else per_column(zeros, g, cols)
    return dequantize_codes(codes, per_column(scales, g, cols), zero, fmt)


def error_bound(qw: QuantizedWeight) -> torch.Tensor:
    """RTN's per-element bound |w - ŵ| <= scale / 2, as float32 [out, in]. (GPTQ trades this
    bound for a smaller output error, so it may exceed it.)"""
    return per_column(qw.scales.float(), group_size(qw.fmt, qw.in_features), qw.in_features) / 2


def nbytes(qw: QuantizedWeight) -> int:
    """Bytes of every stored tensor: codes, scales and zero points."""
    tensors = [qw.qweight, qw.scales] + ([] if qw.zeros is None else [qw.zeros])
    return sum(t.numel() * t.element_size() for t in tensors)


def bits_per_weight(qw: QuantizedWeight) -> float:
    """All-in storage cost: int4 group 64 is 4.25 symmetric, 4.3125 asymmetric (fp16 scales,
    4-bit zero points), 4.5 with float zero points (fp16)."""
    return 8 * nbytes(qw) / (qw.out_features * qw.in_features)
