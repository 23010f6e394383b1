"""Zero points beyond the whole, fp16-stored one: `zero="float"` (an fp16 offset per group over the
group's own range, as llama.cpp's Q4_1 stores it) and whole zero points packed in the format's
bits. What a float zero point buys (groups away from 0, a dequantized Q4_1 weight reproduced),
what fp16 costs it (groups far from 0), and that packed zero points unpack to what was chosen.
Golden values and the independent implementation: tests/runtime/test_formats.py."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimfx.runtime.formats import (QuantFormat, dequantize, error_bound, group_params, nbytes, pack,
                                    quantize_rtn, store_zeros, unpack, zero_points)

FLOAT4 = QuantFormat(4, 32, False, "float")
INT4 = QuantFormat(4, 32, False)


def _max_error(w, fmt):
    return float((dequantize(quantize_rtn(w, fmt)) - w).abs().max())


# ---- what a float zero point buys ---------------------------------------------------------------

def test_a_group_away_from_zero_rounds_finer_with_a_float_zero_point():
    """[1.0, 1.1]: a whole zero point must hold 0 in the range, so the step is 1.1/15 (error up to
    0.037); the float zero point spans the group's own 0.1 (step 0.0067, error up to 0.0033)."""
    w = torch.linspace(1.0, 1.1, 32).repeat(4, 1)
    qw = quantize_rtn(w, FLOAT4)
    assert float(qw.scales.float().max()) == pytest.approx(0.1 / 15, rel=1e-3)
    assert _max_error(w, FLOAT4) <= float(error_bound(qw).max())
    assert _max_error(w, FLOAT4) < _max_error(w, INT4) / 8


def test_a_group_holding_zero_loses_nothing_to_the_whole_zero_point():
    """Where the range holds 0 anyway the two grids differ only in where the zero point sits:
    the float one is never coarser (its range is the group's own, never widened)."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    f, i = quantize_rtn(w, FLOAT4), quantize_rtn(w, INT4)
    assert bool((f.scales <= i.scales).all())
    assert float(((dequantize(f) - w) ** 2).mean()) <= float(((dequantize(i) - w) ** 2).mean())


def _q4_1(out: int, cols: int, seed: int = 0):
    """A dequantized Q4_1 weight: per group of 32, w = u * d + m with fp16 d > 0 and fp16 m,
    computed in float32 as llama.cpp's dequantize_row_q4_1 does. Each group uses codes 0 and 15
    (Q4_1 maps its min and max there), and m sits around -7.5 d (a group roughly centred on 0)
    or a few steps off it, with d about the size of a small model's steps."""
    g = torch.Generator().manual_seed(seed)
    n = cols // 32
    u = torch.randint(0, 16, (out, n, 32), generator=g)
    u[..., 0], u[..., 1] = 0, 15
    d = (torch.rand(out, n, 1, generator=g) * 0.01 + 0.001).half().float()
    m = (-d * (7.5 + 4 * torch.randn(out, n, 1, generator=g))).half().float()
    return (u.float() * d + m).view(out, cols), u.view(out, cols), d.squeeze(-1), m.squeeze(-1)


def test_a_dequantized_q4_1_weight_is_reproduced_almost_exactly():
    """zero=float g32 finds every group's d exactly (float64 range arithmetic on fp16 ends) and
    every code; what remains is the fp16 rounding of z = -m/d: half an fp16 ulp of z, in steps
    of d, i.e. |w - ŵ| <= d * ulp(z) / 2 <= |m| * 2^-11 per weight (plus float32 rounding of
    (u - z) * d, ~|w| * 2^-24). The whole zero point's RTN is further off by ~80x at the worst
    weight (measured 84x here) and far more on average."""
    w, u, d, m = _q4_1(64, 576)
    qw = quantize_rtn(w, FLOAT4)
    assert torch.equal(qw.scales.float(), d)
    assert torch.equal(unpack(qw.qweight, 4, 576), u.to(torch.uint8))
    err = (dequantize(qw) - w).abs()
    bound = (m.abs() * 2 ** -11).repeat_interleave(32, dim=1) + w.abs() * 2 ** -22
    assert bool((err <= bound).all())
    assert float(err.max()) * 50 < _max_error(w, INT4)


# ---- what fp16 costs a float zero point ---------------------------------------------------------

def test_the_zero_point_is_rounded_to_fp16_before_the_codes():
    """z = -min/scale is not an fp16 value in general; the codes are rounded on the stored z, so
    dequantizing the stored tensors gives exactly the weights the codes were chosen for."""
    w = torch.rand(8, 32, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.123456
    scale, zero = group_params(w, FLOAT4)
    assert torch.equal(zero, zero.half().float()) and torch.equal(scale, scale.half().float())
    raw = -w.double().amin(-1) / scale.double()
    assert not torch.equal(raw.float(), zero)  # rounding happened: the test would notice it
    qw = quantize_rtn(w, FLOAT4)
    assert torch.equal(qw.zeros.float(), zero.unsqueeze(-1))
    assert bool(((dequantize(qw) - w).abs() <= error_bound(qw)).all())


@pytest.mark.parametrize("offset", [10.0, 100.0, -1000.0])
def test_a_group_far_from_zero_widens_its_scale_to_keep_the_bound(offset):
    """A group 0.01 wide at `offset`: z = -offset/scale would be ~10^4-10^6, where fp16's ulp is
    8-inf, so the scale widens until |z| <= 2048 (fp16 holds z within 1/2 there) and RTN still
    keeps |w - ŵ| <= scale/2; the step is coarser than the group's own 0.01/15 then."""
    w = offset + torch.rand(4, 32, generator=torch.Generator().manual_seed(2)) * 0.01
    qw = quantize_rtn(w, FLOAT4)
    z = qw.zeros.float()
    assert bool(torch.isfinite(z).all()) and float(z.abs().max()) <= 2048
    assert bool((qw.scales.float() >= abs(offset) / 2048).all())
    assert bool(((dequantize(qw) - w).abs() <= error_bound(qw)).all())


def test_constant_and_zero_groups():
    w = torch.zeros(3, 64)
    w[1] = 0.3
    w[2, :32] = -5.0
    qw = quantize_rtn(w, FLOAT4)
    assert bool(torch.isfinite(qw.scales).all()) and bool(torch.isfinite(qw.zeros).all())
    w_hat = dequantize(qw)
    assert torch.equal(w_hat[0], torch.zeros(64))  # an all-zero group: scale 1, zero point 0
    assert bool(((w - w_hat).abs() <= error_bound(qw)).all())


# ---- packed whole zero points -------------------------------------------------------------------

@given(bits=st.sampled_from([2, 4, 8]), out=st.integers(1, 5), groups=st.integers(1, 20),
       seed=st.integers(0, 2**16))
def test_packed_zero_points_unpack_to_the_same_values(bits, out, groups, seed):
    fmt = QuantFormat(bits, 32, False)
    zero = torch.randint(0, 1 << bits, (out, groups), generator=torch.Generator().manual_seed(seed)).float()
    stored = store_zeros(zero, fmt)
    assert stored.dtype == torch.uint8 and stored.shape == (out, math.ceil(groups * bits / 8))
    assert torch.equal(stored, pack(zero.to(torch.uint8), bits))  # the codes' layout
    assert torch.equal(zero_points(stored, bits, groups), zero)


@given(out=st.integers(1, 4), cols=st.integers(1, 200), bits=st.sampled_from([2, 4, 8]),
       seed=st.integers(0, 2**16))
def test_rtn_stores_the_zero_points_it_chose(out, cols, bits, seed):
    w = torch.randn(out, cols, generator=torch.Generator().manual_seed(seed)) + 0.5
    for fmt in (QuantFormat(bits, 32, False), QuantFormat(bits, 32, False, "float")):
        g = min(32, cols)
        groups = math.ceil(cols / g)
        padded = torch.cat([w, w[:, -1:].expand(out, -cols % g)], dim=1).view(out, groups, g)
        _, zero = group_params(padded, fmt)
        qw = quantize_rtn(w, fmt)
        assert torch.equal(zero_points(qw.zeros, bits, groups), zero)


def test_float_zero_points_are_stored_as_they_are():
    z = torch.tensor([[0.5, -3.25, 2048.0]])
    stored = store_zeros(z, FLOAT4)
    assert stored.dtype == torch.float16 and torch.equal(zero_points(stored, 4, 3), z)


def test_zero_points_of_another_dtype_are_refused():
    with pytest.raises(ValueError, match="neither packed .uint8. nor float"):
        zero_points(torch.zeros(2, 3, dtype=torch.int32), 4, 3)


def test_byte_counts_of_every_zero_point_kind():
    """64 x 576 at group 32 (18 groups a row): codes 288 bytes a row at int4, scales 36; zero
    points 9 bytes packed (4.625 bits/weight all in), 36 as fp16 (5.0)."""
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(3))
    assert nbytes(quantize_rtn(w, QuantFormat(4, 32, True))) == 64 * (288 + 36)
    assert nbytes(quantize_rtn(w, INT4)) == 64 * (288 + 36 + 9)
    assert nbytes(quantize_rtn(w, FLOAT4)) == 64 * (288 + 36 + 36)
    assert 8 * 64 * (288 + 36 + 9) / (64 * 576) == 4.625 and 8 * 64 * (288 + 36 + 36) / (64 * 576) == 5.0
    assert nbytes(quantize_rtn(w, QuantFormat(2, 32, False))) == 64 * (144 + 36 + 5)  # 36 bits -> 5 bytes
    assert nbytes(quantize_rtn(w, QuantFormat(8, 32, False))) == 64 * (576 + 36 + 18)
    assert nbytes(quantize_rtn(w, QuantFormat(8, 32, False, "float"))) == 64 * (576 + 36 + 36)
