"""`refit=true` (passes/precision/refit.py): once GPTQ has chosen the codes, each group's scale (and
float offset) solved for in the calibration-weighted error. The solve is checked against a direct
weighted least squares written here (one design matrix per row), GPTQ with it is never worse than
without on any row (hypothesis; ragged groups, act-order, every zero-point kind) and strictly
better on correlated inputs, what fp16 cannot store is never kept, and a policy's `refit=true`
reaches every target (and is refused without GPTQ)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import slimfx
from slimfx.models import tiny
from slimfx.passes.precision import gptq as gptq_module
from slimfx.passes.precision.encode import Candidate, encode
from slimfx.passes.precision.gptq import gptq, hessian
from slimfx.passes.precision.refit import fitted_params, row_errors, stored_params
from slimfx.runtime.formats import QuantFormat, dequantize, quantize_rtn, unpack, zero_points

KINDS = {"sym": (True, "int"), "int": (False, "int"), "float": (False, "float")}


def _layer(out: int, cols: int, seed: int, offset: float = 0.0):
    """A weight and the H of strongly correlated inputs (x = z·mix), as test_gptq.py makes them."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + 0.1 * torch.eye(cols)
    H, _ = hessian([torch.randn(4 * cols, cols, generator=gen) @ mix])
    return torch.randn(out, cols, generator=gen) * 0.05 + offset, H


def _params(qw):
    """(codes, scales, zero points) of a packed weight, float32, as GPTQ chose them."""
    out, cols = qw.shape
    n = qw.scales.shape[1]
    return (unpack(qw.qweight, qw.fmt.bits, cols), qw.scales.float(), zero_points(qw.zeros, qw.fmt.bits, n))


def _direct_fit(w, codes, zeros, fmt, H, damp):
    """Per row: the design matrix of the row's parameters (each group's scale column, and with a
    float zero point each group's offset column) and the weighted least squares through the
    Cholesky factor of the damped H — nothing shared with refit.py's batched products."""
    out, cols = w.shape
    g = fmt.group or cols
    n = -(-cols // g)
    Hd = H.double() + damp * H.double().diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    R = torch.linalg.cholesky(Hd).T  # Hd = Rᵀ R: ‖R (w − Aθ)‖² is the weighted error
    scales, offsets = torch.zeros(out, n, dtype=torch.float64), torch.zeros(out, n, dtype=torch.float64)
    for r in range(out):
        columns = []
        for k in range(n):
            mask = torch.zeros(cols, dtype=torch.float64)
            mask[k * g:(k + 1) * g] = 1
            if fmt.zero == "float":
                columns.append(codes[r].double() * mask)
            else:
                z = float(1 << (fmt.bits - 1)) if zeros is None else float(zeros[r, k])
                columns.append((codes[r].double() - z) * mask)
        if fmt.zero == "float":
            columns += [torch.zeros(cols, dtype=torch.float64).index_fill_(0, torch.arange(k * g, min(cols, (k + 1) * g)), 1.0)
                        for k in range(n)]
        A = torch.stack(columns, 1)
        theta = torch.linalg.lstsq(R @ A, R @ w[r].double().unsqueeze(1)).solution.squeeze(1)
        scales[r] = theta[:n]
        if fmt.zero == "float":
            offsets[r] = theta[n:]
    return scales, offsets


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cols,group", [(96, 32), (80, 32), (48, None)], ids=["whole", "ragged", "per-channel"])
def test_the_fit_is_the_direct_weighted_least_squares(kind, cols, group):
    sym, zero = KINDS[kind]
    fmt = QuantFormat(2, group, sym, zero)
    w, H = _layer(6, cols, seed=3, offset=0.02 if kind == "float" else 0.0)
    codes, scales, zeros = _params(gptq(w, H, fmt))
    s, z = fitted_params(w, codes, scales, zeros, fmt, H, damp=0.01)
    want_s, want_c = _direct_fit(w, codes, zeros, fmt, H, 0.01)
    torch.testing.assert_close(s.double(), want_s, rtol=1e-4, atol=1e-7)
    if kind == "float":
        torch.testing.assert_close((-s * z).double(), want_c, rtol=1e-4, atol=1e-7)
    else:
        assert z is zeros  # a whole zero point (or the middle code) is not refitted


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 6), cols=st.sampled_from([40, 64, 72]), group=st.sampled_from([16, 32, None]),
       bits=st.sampled_from([2, 4]), kind=st.sampled_from(list(KINDS)), act_order=st.booleans(),
       clip=st.sampled_from(["none", "output"]), seed=st.integers(0, 10_000))
def test_refit_is_never_worse_on_any_row(out, cols, group, bits, kind, act_order, clip, seed):
    sym, zero = KINDS[kind]
    fmt = QuantFormat(bits, group, sym, zero)
    w, H = _layer(out, cols, seed, offset=0.03 if kind == "float" else 0.0)
    plain = gptq(w, H, fmt, act_order=act_order, clip=clip)
    fitted = gptq(w, H, fmt, act_order=act_order, clip=clip, refit=True)
    before, after = (row_errors(w, *_params(q), fmt, H) for q in (plain, fitted))
    assert bool((after <= before * (1 + 1e-12)).all())
    assert fitted.scales.dtype == torch.float16 and bool((fitted.scales > 0).all())
    if kind == "int":  # whole zero points stay what GPTQ chose
        assert torch.equal(fitted.zeros, plain.zeros)


def test_row_errors_is_the_hessian_weighted_error():
    """The yardstick of the never-worse test, checked apart: (w - ŵ) H (w - ŵ)ᵀ per row, not the
    unweighted squared error."""
    fmt = QuantFormat(4, 32, False)
    w, H = _layer(5, 64, seed=1)
    qw = quantize_rtn(w, fmt)
    d = (w - dequantize(qw)).double()
    got = row_errors(w, unpack(qw.qweight, 4, 64), qw.scales.float(), zero_points(qw.zeros, 4, 2), fmt, H)
    torch.testing.assert_close(got, ((d @ H) * d).sum(1))


def test_a_group_whose_codes_are_all_equal_keeps_its_scale_and_offset():
    """Equal codes leave a group's scale and float offset on one line of solutions: the ridge's
    anchor, the group's own (s0, z0), decides, and a grid that fits w exactly stays as it is."""
    fmt = QuantFormat(4, 32, False, "float")
    codes = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    codes[:, :32] = 5
    s0, z0 = torch.tensor([[0.01, 0.02]]).repeat(4, 1), torch.tensor([[2.0, 7.0]]).repeat(4, 1)
    w = (codes.float() - z0.repeat_interleave(32, 1)) * s0.repeat_interleave(32, 1)
    s, z = fitted_params(w, codes, s0, z0, fmt, torch.eye(64, dtype=torch.float64), 0.01)
    torch.testing.assert_close(s[:, 0], s0[:, 0], rtol=1e-4, atol=0)
    torch.testing.assert_close(z[:, 0], z0[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", [QuantFormat(4, 32, True), QuantFormat(2, 32, False),
                                 QuantFormat(2, 32, False, "float"), QuantFormat(4, 32, False, "float")], ids=str)
def test_refit_lowers_the_output_error_on_correlated_inputs(fmt):
    w, H = _layer(32, 128, seed=0)
    err = [float(row_errors(w, *_params(gptq(w, H, fmt, act_order=True, refit=r)), fmt, H).sum())
           for r in (False, True)]
    assert err[1] < 0.97 * err[0], err


def test_what_fp16_cannot_store_is_never_kept(monkeypatch):
    """A fit whose scales are not positive, or whose float zero points fp16 cannot hold within half
    a code, leaves every row as GPTQ had it."""
    fmt = QuantFormat(2, 32, False, "float")
    w, H = _layer(8, 64, seed=1)
    s, z = stored_params(torch.tensor([[0.5, -0.25, 1e-9]]), torch.tensor([[1.0, 2.0, 3.0]]), fmt)
    assert float(s[0, 0]) == 0.5 and s[0, 1:].isnan().all() and not z.isnan().any()
    assert stored_params(torch.ones(1, 2), torch.tensor([[2048.0, 2049.0]]), fmt)[1][0, 1].isnan()
    plain = gptq(w, H, fmt, act_order=True)
    monkeypatch.setattr(gptq_module, "fitted_params", lambda *a, **k: (-torch.ones(8, 2), torch.zeros(8, 2)))
    kept = gptq(w, H, fmt, act_order=True, refit=True)
    assert torch.equal(kept.qweight, plain.qweight) and torch.equal(kept.scales, plain.scales)
    assert torch.equal(kept.zeros, plain.zeros)


def _calib(seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (2, 12), generator=gen),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(3)]


def test_refit_in_a_policy_reaches_every_target():
    """sequential=false: every H comes from the uncompressed model, so each target's codes and
    scales are those of encode() with the H observed by forward hooks on the model itself."""
    from passes_tiny import linear_input_hessians

    lm = tiny("llama")
    calib = _calib()
    rule = "quantize blocks.*.** : Linear int2 group=32 sym=false zero=float method=gptq sequential=false"
    cm = slimfx.compile(lm.model, rule + " refit=true", example_inputs=lm.example_inputs, calib=calib,
                        backend="eager")
    plain = slimfx.compile(lm.model, rule, example_inputs=lm.example_inputs, calib=calib, backend="eager")
    assert cm.report.rules[0].details["refit"] is True and "refit" not in plain.report.rules[0].details
    cand = Candidate("int2", 32, False, "float")
    changed = 0
    for path, h in linear_input_hessians(lm.model, calib).items():
        want = encode(dict(lm.model.named_modules())[path].weight.detach(), cand, "gptq", h, refit=True)
        got, other = (m.program.get_submodule(path) for m in (cm, plain))
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
        assert torch.equal(got.zeros, want.zeros)
        changed += not torch.equal(got.scales, other.scales)
    assert changed > 0  # not a no-op


def test_refit_needs_gptq():
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.parse("policy p {\n    quantize blocks.*.** : Linear int4 group=32 refit=true\n}\n")
    assert "does not use GPTQ" in str(e.value) and "method=gptq" in str(e.value)
    slimfx.parse("policy p {\n    quantize blocks.*.** : Linear int4 group=32 method=gptq refit=true\n}\n")
    slimfx.parse("policy p {\n    precision blocks.*.** : Linear choose {int8, int4} budget avg_bits<=6 "
                 "by output_mse method=gptq refit=true\n}\n")


def test_refit_in_a_budget_scores_and_encodes_with_it():
    lm = tiny("llama")
    rule = "precision blocks.*.** : Linear choose {int8, int2 group=32} budget avg_bits<=5 by output_mse method=gptq"
    cms = [slimfx.compile(lm.model, rule + extra, example_inputs=lm.example_inputs, calib=_calib(), backend="eager")
           for extra in ("", " refit=true")]
    plain, fitted = (cm.report.rules[0].details for cm in cms)
    assert plain["scored_with"] == "gptq" and fitted["scored_with"] == "gptq refit"
    assert fitted["sensitivity"] < plain["sensitivity"]  # the same picks cost less, or cheaper picks were made
