"""Packed weight formats: packing round-trips, RTN stays within scale/2, all-in bits per weight."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimfx.passes.estimate import quantized_bytes
from slimfx.runtime.formats import (QuantFormat, bits_per_weight, dequantize, error_bound, from_rule,
                                    nbytes, pack, quantize_codes, quantize_rtn, unpack)

FORMATS = [QuantFormat(bits, group, sym) for bits in (8, 4, 2) for group in (None, 32, 128)
           for sym in (True, False)]
RAGGED = [(7, 100), (5, 576), (3, 33), (1, 1)]


def _weight(out, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, cols, generator=g) * torch.rand(out, 1, generator=g) * 0.1


# ---- format and rule -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), "bits=3"), (dict(bits=16), "bits=16"), (dict(bits=4, group=0), "group=0"),
    (dict(bits=4, group=-64), "group=-64"), (dict(bits=4, group=True), "group=True"),
    (dict(bits=4, group=64.0), "group=64.0"), (dict(bits=4, sym=1), "sym=1"),
])
def test_format_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantFormat(**kwargs)


def test_from_rule_defaults():
    assert from_rule("int8") == QuantFormat(8, None, True)
    assert from_rule("int4") == QuantFormat(4, 64, True)
    assert from_rule("int2", sym=False) == QuantFormat(2, 64, False)
    assert from_rule("int8", 32) == QuantFormat(8, 32, True)
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
    if not fmt.sym:
        assert qw.zeros.shape == (out, groups) and qw.zeros.dtype == torch.float16
        assert torch.equal(qw.zeros, qw.zeros.round()) and int(qw.zeros.max()) <= fmt.qmax
    w_hat = dequantize(qw)
    assert w_hat.dtype == torch.float32 and w_hat.shape == shape
    assert bool(((w - w_hat).abs() <= error_bound(qw)).all())


@given(fmt=st.sampled_from(FORMATS), out=st.integers(1, 4), cols=st.integers(1, 150),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
def test_rtn_error_bound_property(fmt, out, cols, seed, scale):
    w = _weight(out, cols, seed) * scale
    qw = quantize_rtn(w, fmt)
    assert bool(((w - dequantize(qw)).abs() <= error_bound(qw)).all())


def test_rtn_codes_sit_on_the_grid():
    """Re-quantizing ŵ with its own scales gives back the stored codes: ŵ is on the grid."""
    fmt = QuantFormat(4, 32, False)
    qw = quantize_rtn(_weight(6, 100), fmt)
    s = qw.scales.float().repeat_interleave(32, 1)[:, :100]
    z = qw.zeros.float().repeat_interleave(32, 1)[:, :100]
    assert torch.equal(quantize_codes(dequantize(qw), s, z, fmt), unpack(qw.qweight, 4, 100))


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

@pytest.mark.parametrize("fmt, bits", [
    (from_rule("int8"), 8 + 16 / 576), (from_rule("int4"), 4.25), (from_rule("int4", sym=False), 4.5),
    (from_rule("int4", 32), 4.5), (from_rule("int4", 32, False), 5.0), (from_rule("int2"), 2.25),
    (from_rule("int2", sym=False), 2.5),
], ids=str)
def test_bits_per_weight_all_in(fmt, bits):
    qw = quantize_rtn(_weight(64, 576), fmt)
    assert bits_per_weight(qw) == pytest.approx(bits)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("shape", RAGGED, ids=str)
def test_nbytes_matches_the_plan_estimate(fmt, shape):
    """`slimfx plan` estimates bytes from shapes alone; the packed weight must agree."""
    qw = quantize_rtn(_weight(*shape), fmt)
    name = {8: "int8", 4: "int4", 2: "int2"}[fmt.bits]
    group = fmt.group if fmt.group is not None else (None if fmt.bits == 8 else shape[1])
    assert nbytes(qw) == quantized_bytes(*shape, name, group, fmt.sym)
