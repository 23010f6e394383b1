"""`clip=mse|output` (passes/precision/clip.py): each group's range searched for the least rounding
error. The search is checked against a direct loop written here, never worse than no search on
random groups (hypothesis), strictly better where a group has an outlier, wired the same way into
RTN and GPTQ, and usable from a policy — for whole and float zero points alike (a float zero
point's range shrinks about its middle; the ragged last group's padding weighs nothing)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import slimfx
from slimfx.models import tiny
from slimfx.passes.precision.clip import SHRINKS, searched_params
from slimfx.passes.precision.encode import Candidate, encode
from slimfx.passes.precision.gptq import gptq
from slimfx.runtime.formats import QuantFormat, dequantize, dequantize_codes, group_params, quantize_codes


def _error(w, scale, zero, fmt, weights=None):
    z = None if zero is None else zero.unsqueeze(-1)
    d = dequantize_codes(quantize_codes(w, scale.unsqueeze(-1), z, fmt), scale.unsqueeze(-1), z, fmt) - w
    return ((d * d) if weights is None else d * d * weights).sum(-1)


def _direct_search(row, fmt, weights):
    """One group at a time: every shrink factor, full range first, keep the strictly better."""
    best = None
    for a in SHRINKS:
        scale, zero = group_params(row, fmt, a)
        err = float(_error(row, scale, zero, fmt, weights))
        if best is None or err < best[0]:
            best = (err, scale, zero)
    return best


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 5), g=st.sampled_from([8, 16, 32, 64]), bits=st.sampled_from([2, 4, 8]),
       kind=st.sampled_from(["sym", "int", "float"]), weighted=st.booleans(), outlier=st.floats(1.0, 20.0),
       offset=st.sampled_from([0.0, 3.0]), seed=st.integers(0, 10_000))
def test_the_search_is_never_worse_and_is_the_direct_search(out, g, bits, kind, weighted, outlier, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, g, generator=gen) + offset  # offset: groups away from 0 (float zeros' case)
    w[:, 0] *= outlier  # a heavy tail, as real weights have
    weights = torch.rand(g, generator=gen) + 0.01 if weighted else None
    fmt = QuantFormat(bits, g, kind == "sym", "float" if kind == "float" else "int")
    scale, zero = searched_params(w, fmt, weights)
    plain_scale, plain_zero = group_params(w, fmt)
    searched, plain = _error(w, scale, zero, fmt, weights), _error(w, plain_scale, plain_zero, fmt, weights)
    assert bool((searched <= plain).all())
    assert torch.equal(scale, scale.half().float())  # stored exactly as fp16
    if kind == "int":
        assert torch.equal(zero, zero.round()) and bool(((zero >= 0) & (zero <= fmt.qmax)).all())
    if kind == "float":  # the codes were chosen on the fp16 zero point that is stored
        assert torch.equal(zero, zero.half().float())
    for i in range(out):
        err, s, z = _direct_search(w[i], fmt, weights)
        assert float(scale[i]) == float(s) and (zero is None or float(zero[i]) == float(z))


def test_an_outlier_makes_the_search_pay():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    w[:, ::17] *= 8
    for cand in (Candidate("int4", 64, True), Candidate("int4", 64, False), Candidate("int2", 64, True),
                 Candidate("int4", 64, False, "float")):
        plain = dequantize(encode(w, cand))
        searched = dequantize(encode(w, cand, clip="mse"))
        assert float(((searched - w) ** 2).mean()) < 0.97 * float(((plain - w) ** 2).mean()), cand


def test_gptq_with_an_identity_hessian_is_rtn_with_the_same_search():
    # With H = I no rounding error moves to later columns, so GPTQ's codes are RTN's: the search
    # must be wired into both the same way (each group's range from its own columns).
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    w[:, 5] *= 6
    H = torch.eye(96, dtype=torch.float64)
    for zero in ("int", "float"):
        fmt = QuantFormat(4, 32, False, zero)
        for clip in ("mse", "output"):
            via_gptq = gptq(w, H, fmt, damp=0.0, clip=clip)
            via_rtn = encode(w, Candidate("int4", 32, False, zero), "rtn", H, clip=clip)
            assert torch.equal(via_gptq.qweight, via_rtn.qweight) and torch.equal(via_gptq.scales, via_rtn.scales)
            assert torch.equal(via_gptq.zeros, via_rtn.zeros)
        assert not torch.equal(gptq(w, H, fmt, damp=0.0).scales, via_gptq.scales)  # the search changed ranges


def test_the_ragged_groups_padding_weighs_nothing_in_the_search():
    """100 columns at group 32 leave a ragged group of 4, padded to 32 with copies of its last
    column: without a zero weight on the copies, clip=mse would fit that column 29 times over."""
    w = torch.randn(6, 100, generator=torch.Generator().manual_seed(4)) + 2.0
    w[:, 96] *= 5  # the ragged group's outlier, which the search may clip
    for zero in ("int", "float"):
        fmt = QuantFormat(4, 32, False, zero)
        qw = encode(w, Candidate("int4", 32, False, zero), clip="mse")
        scale, _ = searched_params(w[:, 96:], fmt)  # the ragged group alone, unpadded
        assert torch.equal(qw.scales[:, 3].float(), scale)


def test_a_tie_keeps_the_full_range():
    """Every shrink of this group scores 0 (its only nonzero weight sits on a column of weight 0,
    a dead input under clip=output): the full range is kept, not the last or smallest shrink,
    since that column may be live at inference. Random groups never tie: a mutant `<=` passed."""
    fmt = QuantFormat(4, 8, True)
    w = torch.tensor([[5.0, 0, 0, 0, 0, 0, 0, 0]])
    weights = torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1])
    scale, _ = searched_params(w, fmt, weights)
    assert torch.equal(scale, group_params(w, fmt)[0])


def test_a_float_zero_points_range_shrinks_about_its_middle_by_hand():
    """[3, 18] shrunk by 0.8 is [4.5, 16.5]: scale 12/15 rounded up to fp16, offset -lo/scale in
    fp16 (the search's direct loop reads group_params, so this is the check of the formula)."""
    fmt = QuantFormat(4, 16, False, "float")
    scale, zero = group_params((torch.arange(16.0) + 3).unsqueeze(0), fmt, 0.8)
    want = torch.tensor([12 / 15]).half()
    want = torch.where(want.float() < 12 / 15, torch.nextafter(want, torch.tensor(float("inf")).half()), want).float()
    assert torch.equal(scale, want)
    assert torch.equal(zero, (-4.5 / want.double()).half().float())


def test_clip_in_a_policy():
    lm = tiny("llama")
    cm = slimfx.compile(lm.model, "quantize blocks.*.** : Linear int4 group=32 clip=mse",
                        example_inputs=lm.example_inputs, backend="eager")
    (rule,) = cm.report.rules
    assert rule.details["clip"] == "mse"
    with pytest.raises(slimfx.SpecError, match="clip=output needs calibration inputs") as e:
        slimfx.compile(lm.model, "quantize blocks.*.** : Linear int4 clip=output",
                       example_inputs=lm.example_inputs, calib=[], backend="eager")
    # a model folder without a tokenizer: `slimfx compile` refuses --calib there, so the hint says so
    assert "a model without one, or a vision model, is calibrated only through compile(" in e.value.hint
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.parse("policy p {\n    quantize blocks.*.** int4 clip=max\n}\n")
    assert "none" in str(e.value) and "output" in str(e.value)


def test_rtn_clip_output_in_a_policy_reads_only_each_input_s_diagonal(monkeypatch):
    """Before RTN, clip=output weighs each input column by E[x_j²]: the pass accumulates only that
    diagonal (never an [in, in] H: on SmolLM2 every full H at once was 0.8 GiB), and its codes are
    those of encode() with the full H observed here by forward hooks on the model itself."""
    from slimfx.passes import calibrate
    from slimfx.passes.calibrate import DiagonalAccumulator
    from passes_tiny import linear_input_hessians

    lm = tiny("llama")
    gen = torch.Generator().manual_seed(5)
    calib = [{"input_ids": torch.randint(0, 100, (2, 12), generator=gen),
              "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(3)]
    full = []
    real_init = calibrate.HessianAccumulator.__init__
    def counted_init(self, *args, **kwargs):
        if type(self) is calibrate.HessianAccumulator:  # not its diagonal subclass
            full.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(calibrate.HessianAccumulator, "__init__", counted_init)
    cm = slimfx.compile(lm.model, "quantize blocks.*.** : Linear int4 group=32 clip=output",
                        example_inputs=lm.example_inputs, calib=calib, backend="eager")
    assert not full
    H = linear_input_hessians(lm.model, calib)
    for path, h in H.items():
        mod = cm.program.get_submodule(path)
        want = encode(dict(lm.model.named_modules())[path].weight.detach(), Candidate("int4", 32, True), "rtn", h,
                      clip="output")
        assert torch.equal(mod.qweight, want.qweight) and torch.equal(mod.scales, want.scales), path
    acc = DiagonalAccumulator()
    rows = torch.randn(40, 7, generator=gen)
    acc.add(rows[:15])
    acc.add(rows[15:])
    torch.testing.assert_close(acc.H, (rows.double().T @ rows.double() / 40).diagonal())
