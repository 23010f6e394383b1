"""Packed weight formats: golden codes/scales/zeros/bytes written out literally, RTN equal to an
independent implementation of the layout in runtime/formats.py's docstring (whole zero points
packed, float zero points in fp16), packing round-trips, RTN stays within scale/2, all-in bits per
weight. Float zero points on their own: tests/runtime/test_float_zeros.py."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimfx.passes.estimate import quantized_bytes
from slimfx.runtime.formats import (QuantFormat, bits_per_weight, dequantize, error_bound, from_rule,
                                    nbytes, pack, quantize_rtn, unpack, zero_points)

FORMATS = [QuantFormat(bits, group, sym, zero) for bits in (8, 4, 2) for group in (None, 32, 128)
           for sym, zero in ((True, "int"), (False, "int"), (False, "float"))]
RAGGED = [(7, 100), (5, 576), (3, 33), (1, 1)]


def _weight(out, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, cols, generator=g) * torch.rand(out, 1, generator=g) * 0.1


# ---- format and rule -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), "bits=3"), (dict(bits=16), "bits=16"), (dict(bits=4, group=0), "group=0"),
    (dict(bits=4, group=-64), "group=-64"), (dict(bits=4, group=True), "group=True"),
    (dict(bits=4, group=64.0), "group=64.0"), (dict(bits=4, sym=1), "sym=1"),
    (dict(bits=4, sym=False, zero="half"), "zero='half'"), (dict(bits=4, zero="float"), "pass sym=False"),
])
def test_format_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantFormat(**kwargs)


def test_from_rule_defaults():
    assert from_rule("int8") == QuantFormat(8, None, True)
    assert from_rule("int4") == QuantFormat(4, 64, True)
    assert from_rule("int2", sym=False) == QuantFormat(2, 64, False)
    assert from_rule("int8", 32) == QuantFormat(8, 32, True)
    assert from_rule("int4", 32, False, "float") == QuantFormat(4, 32, False, "float")
    with pytest.raises(ValueError, match="'fp16' is not a packed integer format"):
        from_rule("fp16")


# ---- packing ---------------------------------------------------------------------------------

def test_pack_layout_is_little_end_first():
    codes = torch.tensor([[1, 2, 3], [15, 0, 7]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x03], [0x0F, 0x07]]
    assert pack(torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b11]]
    assert pack(codes, 8).tolist() == codes.tolist()


@given(bits=st.sampled_from([2, 4, 8]), out=st.integers(1, 5), cols=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, out, cols, seed):
    codes = torch.randint(0, 1 << bits, (out, cols), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (out, math.ceil(cols * bits / 8))
    assert torch.equal(unpack(packed, bits, cols), codes)


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        pack(torch.tensor([[16]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        pack(torch.tensor([[1]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits=3"):
        pack(torch.tensor([[1]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="cannot hold 9 4-bit codes; expected 5"):
        unpack(torch.zeros(2, 4, dtype=torch.uint8), 4, 9)


# ---- an independent implementation of the layout (runtime/formats.py's docstring) -------------
# Written from the format description alone, one group and one element at a time in numpy
# float32: nothing here calls slimfx. RTN must agree with it exactly (codes, scales, zeros, bytes).

def _fp16_ceil(s) -> np.float32:
    """The smallest fp16 value >= s (a float32 or float64 number)."""
    h = np.float16(s)
    if np.float64(h) < s:
        h = np.nextafter(h, np.float16(np.inf))
    return np.float32(h)


def _ref_rtn(w: np.ndarray, bits: int, group: int | None, sym: bool, zero: str = "int"):
    """(codes int [out, in], scales float [out, groups], zeros [out, groups]: whole numbers, or
    fp16 values for float zero points) of float32 `w`."""
    out, cols = w.shape
    g = cols if group is None else min(group, cols)
    qmax = 2 ** bits - 1
    codes = np.zeros((out, cols), np.int64)
    n = -(-cols // g)
    scales, zeros = np.zeros((out, n), np.float32), np.zeros((out, n), np.int64 if zero == "int" else np.float32)
    for r in range(out):
        for k, start in enumerate(range(0, cols, g)):
            x = w[r, start:start + g]
            if sym:  # scale = max|w| / (2^(bits-1) - 1/2), zero point 2^(bits-1)
                m = np.float32(np.abs(x).max())
                s = _fp16_ceil(m / np.float32(2 ** (bits - 1) - 0.5)) if m > 0 else np.float32(1)
                z = 2 ** (bits - 1)
            elif zero == "float":  # the group's own range (float64); |z| <= 2048; z rounded to fp16 first
                lo, hi = np.float64(x.min()), np.float64(x.max())
                s64 = max((hi - lo) / qmax, abs(lo) / 2048)
                s = _fp16_ceil(s64) if s64 > 0 else np.float32(1)
                z = np.float32(np.float16(-lo / np.float64(s)))
                scales[r, k], zeros[r, k] = s, z
                for c in range(start, min(start + g, cols)):
                    codes[r, c] = int(np.clip(np.round(np.float64(w[r, c]) / s + z), 0, qmax))
                continue
            else:  # range widened to hold 0; scale = (max - min) / qmax, zero = round(-min / scale)
                lo, hi = min(np.float32(x.min()), np.float32(0)), max(np.float32(x.max()), np.float32(0))
                s = _fp16_ceil(np.float32(hi - lo) / np.float32(qmax)) if hi > lo else np.float32(1)
                z = int(np.round(-lo / s))
            scales[r, k], zeros[r, k] = s, z
            for c in range(start, min(start + g, cols)):
                codes[r, c] = int(np.clip(np.round(w[r, c] / s) + z, 0, qmax))
    return codes, scales, zeros


def _ref_pack(codes: np.ndarray, bits: int) -> list[list[int]]:
    """8 // bits codes per byte, code j of a byte in bits [j*bits, (j+1)*bits), zero-padded rows."""
    per = 8 // bits
    rows = []
    for row in codes:
        row_bytes = []
        for i in range(0, len(row), per):
            byte = 0
            for j, c in enumerate(row[i:i + per]):
                byte |= int(c) << (j * bits)
            row_bytes.append(byte)
        rows.append(row_bytes)
    return rows


def _ref_dequantize(codes, scales, zeros, group):
    """(code - zero) * scale, element by element, in float32."""
    out, cols = codes.shape
    g = cols if group is None else min(group, cols)
    w = np.zeros((out, cols), np.float32)
    for r in range(out):
        for c in range(cols):
            w[r, c] = np.float32(codes[r, c] - zeros[r, c // g]) * scales[r, c // g]
    return w


def _assert_matches_reference(w: torch.Tensor, fmt: QuantFormat):
    qw = quantize_rtn(w, fmt)
    codes, scales, zeros = _ref_rtn(w.float().numpy(), fmt.bits, fmt.group, fmt.sym, fmt.zero)
    np.testing.assert_array_equal(unpack(qw.qweight, fmt.bits, w.shape[1]).numpy(), codes)
    np.testing.assert_array_equal(qw.scales.float().numpy(), scales)
    if fmt.sym:
        assert qw.zeros is None
    elif fmt.zero == "float":
        assert qw.zeros.dtype == torch.float16
        np.testing.assert_array_equal(qw.zeros.float().numpy(), zeros)
    else:  # packed like codes, along the group axis
        assert qw.zeros.dtype == torch.uint8 and qw.zeros.tolist() == _ref_pack(zeros, fmt.bits)
    assert qw.qweight.tolist() == _ref_pack(codes, fmt.bits)
    np.testing.assert_array_equal(dequantize(qw).numpy(), _ref_dequantize(codes, scales, zeros, fmt.group))


# ---- golden values ---------------------------------------------------------------------------
# A 3 x 10 weight at group 4: groups are columns [0:4], [4:8] and a ragged [8:10]. Row 1 starts
# with an all-zero group (scale 1), row 2 ends with one; row 1's [4:8] is all positive and its
# [8:10] all negative (asymmetric zero points 0 and qmax). Several codes sit within 1e-3 of a
# rounding boundary only because the scale is rounded *up* to fp16 (e.g. row 0's 0.3 at scale
# 0.2 -> 0.2000732421875 is 1.4995 steps: code 8 + 1; with round-to-nearest fp16, 0.199951171875,
# it would be 1.5004 steps and code 10). By hand, int4 symmetric row 0, group [0:4]:
# scale = 0.9375 / 7.5 = 0.125 (an fp16 value), codes 8 + round([7.5, -4, 2, 0.75]) =
# [16 -> 15 (clamped), 4, 10, 9]; bytes little end first: 0x4F, 0x9A.
GOLDEN_W = [
    [0.9375, -0.5, 0.25, 0.09375, 1.5, -1.5, 0.0, 0.3, -0.2, 0.05],
    [0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4, -0.7, -0.1],
    [-0.03, 0.01, 0.02, -0.01, 2.0, 1.0, -0.5, 0.25, 0.0, 0.0],
]
# (bits, group, sym): codes, scales, zeros (None: symmetric), packed bytes
GOLDEN = {
    (4, 4, True): (
        [[15, 4, 10, 9, 15, 1, 8, 9, 1, 10], [8, 8, 8, 8, 10, 12, 14, 15, 1, 7], [1, 10, 13, 6, 15, 12, 6, 9, 8, 8]],
        [[0.125, 0.2000732421875, 0.02667236328125], [1.0, 0.0533447265625, 0.0933837890625],
         [0.004001617431640625, 0.266845703125, 1.0]],
        None,
        [[0x4F, 0x9A, 0x1F, 0x98, 0xA1], [0x88, 0x88, 0xCA, 0xFE, 0x71], [0xA1, 0x6D, 0xCF, 0x96, 0x88]]),
    (4, 4, False): (
        [[15, 0, 8, 6, 14, 0, 7, 8, 0, 15], [0, 0, 0, 0, 4, 7, 11, 15, 0, 13], [0, 12, 15, 6, 15, 9, 0, 4, 0, 0]],
        [[0.09588623046875, 0.2000732421875, 0.0166778564453125], [1.0, 0.02667236328125, 0.04669189453125],
         [0.00333404541015625, 0.166748046875, 1.0]],
        [[5, 7, 12], [0, 0, 15], [9, 3, 0]],
        [[0x0F, 0x68, 0x0E, 0x87, 0xF0], [0x00, 0x00, 0x74, 0xFB, 0xD0], [0xC0, 0x6F, 0x9F, 0x40, 0x00]]),
    (8, None, True): (
        [[208, 86, 149, 136, 255, 1, 128, 153, 111, 132], [128, 128, 128, 128, 146, 164, 183, 201, 1, 110],
         [126, 129, 129, 127, 255, 192, 96, 144, 128, 128]],
        [[0.01177215576171875], [0.0054931640625], [0.0157012939453125]],
        None,
        None),  # int8 bytes are the codes
    (8, 4, False): (
        [[255, 0, 133, 106, 254, 0, 127, 152, 0, 255], [0, 0, 0, 0, 64, 127, 191, 255, 0, 219],
         [0, 204, 255, 102, 255, 153, 0, 76, 0, 0]],
        [[0.00563812255859375, 0.01177215576171875, 0.0009813308715820312], [1.0, 0.0015687942504882812, 0.00274658203125],
         [0.00019609928131103516, 0.0098114013671875, 1.0]],
        [[89, 127, 204], [0, 0, 255], [153, 51, 0]],
        None),
    (2, 4, True): (
        [[3, 1, 2, 2, 3, 0, 2, 2, 1, 2], [2, 2, 2, 2, 2, 3, 3, 3, 1, 2], [1, 2, 3, 2, 3, 3, 2, 2, 2, 2]],
        [[0.625, 1.0, 0.1334228515625], [1.0, 0.266845703125, 0.466796875], [0.0200042724609375, 1.333984375, 1.0]],
        None,
        [[0xA7, 0xA3, 0x09], [0xAA, 0xFE, 0x09], [0xB9, 0xAF, 0x0A]]),
    (2, 4, False): (
        [[3, 0, 2, 1, 3, 0, 2, 2, 0, 3], [0, 0, 0, 0, 1, 1, 2, 3, 0, 3], [0, 3, 3, 1, 3, 2, 0, 1, 0, 0]],
        [[0.479248046875, 1.0, 0.0833740234375], [1.0, 0.1334228515625, 0.2333984375],
         [0.0166778564453125, 0.83349609375, 1.0]],
        [[1, 2, 2], [0, 0, 3], [2, 1, 0]],
        [[0x63, 0xA3, 0x0C], [0x00, 0xE5, 0x0C], [0x7C, 0x4B, 0x00]]),
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: f"int{k[0]}-g{k[1]}-{'sym' if k[2] else 'asym'}")
def test_rtn_golden_codes_scales_zeros_and_bytes(key):
    bits, group, sym = key
    codes, scales, zeros, packed = GOLDEN[key]
    w = torch.tensor(GOLDEN_W)
    qw = quantize_rtn(w, QuantFormat(bits, group, sym))
    assert unpack(qw.qweight, bits, 10).tolist() == codes
    assert qw.scales.dtype == torch.float16 and qw.scales.float().tolist() == scales
    if sym:
        assert qw.zeros is None
    else:  # whole zero points, packed `bits` bits each along the group axis
        assert qw.zeros.dtype == torch.uint8 and unpack(qw.zeros, bits, len(zeros[0])).tolist() == zeros
    assert qw.qweight.tolist() == (codes if packed is None else packed)
    # ŵ = (code - zero) * scale, written out from the golden tables
    g = 10 if group is None else group
    mid = 1 << (bits - 1)
    expected = [[(codes[r][c] - (mid if sym else zeros[r][c // g])) * scales[r][c // g] for c in range(10)]
                for r in range(3)]
    assert dequantize(qw).tolist() == expected
    # the independent implementation below agrees with the golden tables too
    ref_codes, ref_scales, ref_zeros = _ref_rtn(w.numpy(), bits, group, sym)
    assert ref_codes.tolist() == codes and ref_scales.tolist() == scales
    assert sym or ref_zeros.tolist() == zeros


def test_golden_hand_checks():
    """Two groups worked by hand from the format description, independent of the tables above."""
    w = torch.tensor(GOLDEN_W)
    # int4 symmetric, row 0, group [4:8] = [1.5, -1.5, 0, 0.3]: 1.5 / 7.5 = 0.2 is not an fp16
    # value; rounded up it is 0.2000732421875, so -1.5 is -7.497 steps: code 8 - 7 = 1, not 0.
    qw = quantize_rtn(w, QuantFormat(4, 4, True))
    assert float(qw.scales[0, 1]) == 0.2000732421875
    assert unpack(qw.qweight, 4, 10)[0, 4:8].tolist() == [15, 1, 8, 9]
    # int4 asymmetric, row 1, ragged group [8:10] = [-0.7, -0.1]: range [-0.7, 0], scale
    # 0.7 / 15 -> fp16 up 0.04669189453125, zero round(0.7 / scale) = round(14.992) = 15,
    # codes 15 + round([-14.992, -2.142]) = [0, 13].
    qw = quantize_rtn(w, QuantFormat(4, 4, False))
    assert float(qw.scales[1, 2]) == 0.04669189453125 and float(zero_points(qw.zeros, 4, 3)[1, 2]) == 15
    assert unpack(qw.qweight, 4, 10)[1, 8:].tolist() == [0, 13]
    # The zero points [[5, 7, 12], [0, 0, 15], [9, 3, 0]] packed two per byte, little end first:
    # 5 | 7 << 4 = 0x75, then 12 padded; 0x00, 0x0F; 9 | 3 << 4 = 0x39, 0x00.
    assert qw.zeros.tolist() == [[0x75, 0x0C], [0x00, 0x0F], [0x39, 0x00]]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("shape", RAGGED, ids=str)
def test_rtn_equals_the_independent_implementation(fmt, shape):
    _assert_matches_reference(_weight(*shape), fmt)


# ---- round to nearest ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("shape", RAGGED, ids=str)
def test_rtn_within_half_a_step(fmt, shape):
    w = _weight(*shape)
    qw = quantize_rtn(w, fmt)
    out, cols = shape
    groups = 1 if fmt.group is None else math.ceil(cols / min(fmt.group, cols))
    assert qw.qweight.shape == (out, math.ceil(cols * fmt.bits / 8)) and qw.qweight.dtype == torch.uint8
    assert qw.scales.shape == (out, groups) and qw.scales.dtype == torch.float16
    assert (qw.zeros is None) == fmt.sym
    if not fmt.sym and fmt.zero == "int":  # whole zero points, packed
        assert qw.zeros.shape == (out, math.ceil(groups * fmt.bits / 8)) and qw.zeros.dtype == torch.uint8
        assert int(zero_points(qw.zeros, fmt.bits, groups).max()) <= fmt.qmax
    if fmt.zero == "float":
        assert qw.zeros.shape == (out, groups) and qw.zeros.dtype == torch.float16
    w_hat = dequantize(qw)
    assert w_hat.dtype == torch.float32 and w_hat.shape == shape
    assert bool(((w - w_hat).abs() <= error_bound(qw)).all())


@given(fmt=st.sampled_from(FORMATS), out=st.integers(1, 4), cols=st.integers(1, 150),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
def test_rtn_error_bound_property(fmt, out, cols, seed, scale):
    w = _weight(out, cols, seed) * scale
    qw = quantize_rtn(w, fmt)
    # The bound alone would also hold for an inflated scale (e.g. every code at the zero point with
    # scale 2 max|w|); equality with the independent implementation pins the scale and the codes.
    assert bool(((w - dequantize(qw)).abs() <= error_bound(qw)).all())
    _assert_matches_reference(w, fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_zero_and_constant_groups_are_finite(fmt):
    w = torch.zeros(3, 70)
    w[1, :40] = 0.25  # a constant group (and a partly constant one)
    w[2, 5] = -1e-30  # below fp16's smallest scale
    qw = quantize_rtn(w, fmt)
    assert bool(torch.isfinite(qw.scales).all()) and bool((qw.scales > 0).all())
    w_hat = dequantize(qw)
    assert bool(torch.isfinite(w_hat).all())
    assert torch.equal(w_hat[0], torch.zeros(70))  # exact zeros stay exactly zero
    assert bool(((w - w_hat).abs() <= error_bound(qw)).all())
    _assert_matches_reference(w, fmt)  # scale 1 for all-zero groups, fp16's smallest for -1e-30


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_rtn_accepts_float_dtypes(dtype):
    w = _weight(4, 40).to(dtype)
    qw = quantize_rtn(w, QuantFormat(4, 16, True))
    assert bool(((w.float() - dequantize(qw)).abs() <= error_bound(qw)).all())


@pytest.mark.parametrize("w, match", [
    (torch.ones(4, 4, dtype=torch.int32), "floating-point"),
    (torch.ones(4), "2-D"),
    (torch.full((2, 2), math.nan), "NaN"),
    (torch.empty(0, 4), "empty"),
    (torch.full((2, 2), 1e9), "too large"),
])
def test_rtn_rejects_bad_weights(w, match):
    with pytest.raises(ValueError, match=match):
        quantize_rtn(w, QuantFormat(8))


# ---- storage cost ----------------------------------------------------------------------------

# Whole zero points cost `bits` bits per group (packed, each row rounded up to whole bytes), float
# ones 16 (fp16): int4 g32 asym is 4 + 16/32 + 4/32 = 4.625 bits per weight, with float zeros
# 4 + 16/32 + 16/32 = 5.0. A row of 576 holds 18 groups of 32 or 9 of 64: 9 int4 zero points take
# 5 bytes (40 bits per 576 weights), 9 int2 ones 3 bytes, 18 int2 ones 5 bytes.
@pytest.mark.parametrize("fmt, bits", [
    (from_rule("int8"), 8 + 16 / 576), (from_rule("int8", sym=False), 8 + 24 / 576),
    (from_rule("int8", sym=False, zero="float"), 8 + 32 / 576), (from_rule("int8", 32, False), 8 + 24 / 32),
    (from_rule("int4"), 4.25), (from_rule("int4", sym=False), 4.25 + 40 / 576),
    (from_rule("int4", sym=False, zero="float"), 4.5),
    (from_rule("int4", 32), 4.5), (from_rule("int4", 32, False), 4.625), (from_rule("int4", 32, False, "float"), 5.0),
    (from_rule("int2"), 2.25), (from_rule("int2", sym=False), 2.25 + 24 / 576), (from_rule("int2", sym=False, zero="float"), 2.5),
    (from_rule("int2", 32, False), 2.5 + 40 / 576), (from_rule("int2", 32, False, "float"), 3.0),
], ids=str)
def test_bits_per_weight_all_in(fmt, bits):
    qw = quantize_rtn(_weight(64, 576), fmt)
    assert bits_per_weight(qw) == pytest.approx(bits, rel=1e-12)


def test_packed_zero_points_round_up_to_whole_bytes_per_row():
    """9 int4 zero points per row (576 at group 64) take 5 bytes, 3 int2 ones (192 at 64) 1 byte."""
    assert quantize_rtn(_weight(8, 576), from_rule("int4", sym=False)).zeros.shape == (8, 5)
    assert quantize_rtn(_weight(8, 192), from_rule("int2", sym=False)).zeros.shape == (8, 1)
    assert nbytes(quantize_rtn(_weight(8, 576), from_rule("int4", sym=False))) == 8 * (288 + 18 + 5)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("shape", RAGGED, ids=str)
def test_nbytes_matches_the_plan_estimate(fmt, shape):
    """`slimfx plan` estimates bytes from shapes alone; the packed weight must agree."""
    qw = quantize_rtn(_weight(*shape), fmt)
    name = {8: "int8", 4: "int4", 2: "int2"}[fmt.bits]
    group = fmt.group if fmt.group is not None else (None if fmt.bits == 8 else shape[1])
    assert nbytes(qw) == quantized_bytes(*shape, name, group, fmt.sym, fmt.zero)


def test_the_default_groups_are_the_checkers():
    """Two copies (the checker imports no torch, the runtime nothing of the compiler): one table."""
    from slimfx.dsl.schema import DEFAULT_GROUP
    from slimfx.runtime import formats

    assert formats.DEFAULT_GROUP == DEFAULT_GROUP
