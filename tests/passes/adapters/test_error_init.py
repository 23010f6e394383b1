"""`adapt … init=error` (passes/adapters/error_init.py): the adapter's s·B·A against the optimum
written here a different way (the projection of the error onto the top singular vectors of the
error's outputs on the calibration rows), the output error of every target it touches measured
on the original model's inputs, the whole model closer to the original, DoRA equal to LoRA at the
start, training, save/load, and every refusal."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch
from hypothesis import given, settings, strategies as st

import slimfx
from slimfx import SpecError
from slimfx.models import tiny
from slimfx.passes.adapters import error_init
from slimfx.passes.adapters.error_init import error_adapter
from slimfx.passes.calibrate import HessianAccumulator
from slimfx.passes.lora import base_sites, base_weight
from slimfx.runtime.formats import QuantFormat, QuantizedWeight, dequantize

from passes_tiny import linear_input_hessians, token_batches

QUANT = "quantize blocks.*.** : Linear int2 group=16"
FMT = QuantFormat(2, 16, True)


def _calib(n=3, rows=2, length=16, seed=0):
    return token_batches(n, rows, length, seed)


def _policy(*rules: str) -> str:
    return "policy p {\n" + "\n".join(rules) + "\n}"


def _optimum(d: torch.Tensor, X: torch.Tensor, rank: int) -> torch.Tensor:
    """argmin over rank-r M of ‖(d − M) Xᵀ‖_F: the best rank-r approximation of d Xᵀ is
    U_r U_rᵀ d Xᵀ (Eckart–Young), so M = U_r U_rᵀ d."""
    U = torch.linalg.svd(d @ X.T, full_matrices=False)[0][:, :rank]
    return U @ U.T @ d


@settings(max_examples=25, deadline=None)
@given(out=st.integers(4, 40), inp=st.integers(4, 40), rank=st.integers(1, 6), scale=st.floats(0.25, 4.0),
       seed=st.integers(0, 2**16))
def test_the_adapter_is_the_optimal_rank_r_correction(out, inp, rank, scale, seed):
    rank = min(rank, out, inp)  # the pass refuses a rank above the weight's (test_adapt.py)
    gen = torch.Generator().manual_seed(seed)
    X = (torch.randn(3 * inp, inp, generator=gen, dtype=torch.float64)
         @ torch.randn(inp, inp, generator=gen, dtype=torch.float64))  # correlated, full rank
    w = torch.randn(out, inp, generator=gen)
    w_hat = w + 0.1 * torch.randn(out, inp, generator=gen)
    H = X.T @ X / X.shape[0]
    fit = error_adapter(w, w_hat, H, rank, scale)
    assert fit.A.shape == (rank, inp) and fit.B.shape == (out, rank)
    d = (w - w_hat).double()
    want = _optimum(d, X, rank)
    got = scale * fit.B.double() @ fit.A.double()
    torch.testing.assert_close(got, want, atol=2e-5 * float(want.abs().max()) + 1e-6, rtol=0)
    assert fit.after <= fit.before
    # The optimum's error, computed directly on the rows.
    direct = float(((d - want) @ X.T).pow(2).sum()) / X.shape[0]
    assert fit.after == pytest.approx(direct, rel=1e-3, abs=1e-8)


def test_rank_beyond_the_error_starts_those_terms_as_a_fresh_lora():
    """An error of rank 1 and an adapter of rank 4: one term holds the error, three have B = 0 and a
    nonzero row of A (a dead term would never train: both of its gradients would be zero)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 10, generator=gen)
    d = torch.randn(12, 1, generator=gen) @ torch.randn(1, 10, generator=gen)
    fit = error_adapter(w, w - d, torch.eye(10, dtype=torch.float64), 4, 2.0)
    torch.testing.assert_close(2.0 * fit.B @ fit.A, d, atol=1e-5, rtol=0)
    assert int((fit.B.abs().sum(0) > 0).sum()) == 1
    assert bool((fit.A.norm(dim=1) > 0).all())
    zero = error_adapter(w, w, torch.eye(10, dtype=torch.float64), 4, 2.0)
    with pytest.raises(ValueError, match="rank 1 to 10"):
        error_adapter(w, w, torch.eye(10, dtype=torch.float64), 11, 2.0)
    assert torch.count_nonzero(zero.B) == 0 and bool((zero.A.norm(dim=1) > 0).all())


@pytest.fixture(scope="module")
def compiled():
    lm = tiny("llama", layers=2)
    calib = _calib()
    policy = _policy(QUANT, "adapt blocks.*.** : Linear lora rank=8 alpha=16 init=error")
    return lm, calib, slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, calib=calib,
                                     backend="eager")


def test_one_hessian_is_held_at_a_time_and_shared_by_the_targets_reading_it(monkeypatch):
    """q/k/v read one input: one H and one moment for the three. The sweep holds one input's H
    at a time (a calibration run of every input at once held them all: 0.8 GiB on SmolLM2)."""
    lm = tiny("llama", layers=3)
    live, made, held = weakref.WeakSet(), [], []

    class Counted(HessianAccumulator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.add(self)
            held.append(len(live))

    class Moment(error_init.InputMoment):
        def __init__(self, H):
            super().__init__(H)
            made.append(self)
            held.append(len(live))

    monkeypatch.setattr(error_init, "HessianAccumulator", Counted)
    monkeypatch.setattr(error_init, "InputMoment", Moment)
    slimfx.compile(lm.model, _policy(QUANT, "adapt blocks.*.** : Linear lora rank=4 alpha=8 init=error"),
                   example_inputs=lm.example_inputs, calib=_calib(), backend="eager")
    assert len(made) == 3 * 4  # per block: q/k/v's input, o's, gate/up's, down's
    assert len(held) == 24 and max(held) == 1  # one input's H alive, never more


# The inputs of a Llama block in graph order, and the linears reading each.
_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _sequential_reference(model, w_hats: dict[str, torch.Tensor], calib, rank: int, scale: float,
                          sequential: bool = True) -> dict[str, torch.Tensor]:
    """s·B·A of every block linear, written here on the Hugging Face model itself: its weights set
    to the encoded ones, then input by input in graph order H from a forward hook on the calibration
    batches, `error_adapter` for each linear reading it, and (sequential) the adapter merged into
    the weight before the next input is observed."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    originals = {p: w.clone() for p, w in ((p, modules[p].weight.detach()) for p in w_hats)}
    with torch.no_grad():
        for p, w in w_hats.items():
            modules[p].weight.copy_(w)
    corrections, merged = {}, {}
    for i in range(len(model.model.layers)):
        for group in _GROUPS:
            paths = [f"model.layers.{i}.{name}" for name in group]
            acc = HessianAccumulator()
            hook = modules[paths[0]].register_forward_hook(lambda m, args, out: acc.add(args[0]))
            with torch.no_grad():
                for batch in calib:
                    model(**batch)
            hook.remove()
            for p in paths:
                fit = error_adapter(originals[p], w_hats[p], acc.H, rank, scale)
                corrections[p] = scale * fit.B @ fit.A
                merged[p] = w_hats[p] + corrections[p]
            if sequential:
                with torch.no_grad():
                    for p in paths:
                        modules[p].weight.copy_(merged[p])
    return corrections


def test_each_fit_sees_the_adapters_before_it():
    """The sweep fits input by input on the quantized model with the adapters fitted so far in
    place (as sequential GPTQ sees the compressed blocks before it): every s·B·A equals the
    sequential loop written here on the Hugging Face model, and differs from fits that all saw the
    model without adapters (what the pass did before)."""
    lm = tiny("llama", layers=2)
    calib = _calib()
    cm = slimfx.compile(lm.model, _policy(QUANT, "adapt blocks.*.** : Linear lora rank=4 alpha=8 init=error"),
                        example_inputs=lm.example_inputs, calib=calib, backend="eager")
    quantized = slimfx.compile(lm.model, _policy(QUANT), example_inputs=lm.example_inputs, calib=calib,
                               backend="eager").graph
    w_hats = {p: base_weight(quantized, base_sites(quantized, quantized.targets[p])[0]) for p in cm.adapters}
    scale = cm.adapters["model.layers.0.self_attn.q_proj"].scale
    want = _sequential_reference(lm.model, w_hats, calib, 4, scale)
    at_once = _sequential_reference(lm.model, w_hats, calib, 4, scale, sequential=False)
    moved = 0
    for path in cm.adapters:
        mod = cm.program.get_submodule(path)
        got = scale * mod.lora_B.detach() @ mod.lora_A.detach()
        tol = 1e-4 * float(want[path].abs().max())
        torch.testing.assert_close(got, want[path], atol=tol, rtol=0)
        moved += float((at_once[path] - want[path]).abs().max()) > 100 * tol
    assert moved >= len(cm.adapters) - 3  # all but q/k/v of the first block, which see no adapter


def test_every_target_s_output_error_goes_down(compiled):
    lm, calib, cm = compiled
    H = linear_input_hessians(lm.model, calib)
    weights = dict(lm.model.named_modules())
    assert set(cm.adapters) == set(H)
    for path, h in H.items():
        w = weights[path].weight.detach().double()
        mod = cm.program.get_submodule(path)
        w_hat = dequantize(QuantizedWeight(mod.qweight, mod.scales, getattr(mod, "zeros", None), FMT,
                                           tuple(w.shape))).double()
        s = cm.adapters[path].scale
        corrected = w_hat + s * mod.lora_B.detach().double() @ mod.lora_A.detach().double()
        before = float((((w - w_hat) @ h) * (w - w_hat)).sum())
        after = float((((w - corrected) @ h) * (w - corrected)).sum())
        assert after < 0.8 * before, f"{path}: {after:.4g} vs {before:.4g}"
    rule = cm.report.rules[1]
    assert rule.details["init"] == "error" and 0 < rule.details["output_error_left"] < 0.8
    assert any("init=error" in n for n in rule.notes)


def test_the_model_starts_closer_to_the_original(compiled):
    lm, calib, cm = compiled
    plain = slimfx.compile(lm.model, _policy(QUANT), example_inputs=lm.example_inputs, backend="eager")
    batch = _calib(n=1, seed=7)[0]
    with torch.no_grad():
        ref = lm.model(**batch).logits
        err_plain = (plain(**batch).logits - ref).pow(2).mean()
        err_fixed = (cm(**batch).logits - ref).pow(2).mean()
    assert err_fixed < 0.8 * err_plain, (float(err_fixed), float(err_plain))


def test_dora_starts_where_lora_does(compiled):
    """DoRA's magnitude starts at ‖ŵ + s·B·A‖, so k = 1 and its outputs equal LoRA's."""
    lm, calib, cm = compiled
    dora = slimfx.compile(lm.model, _policy(QUANT, "adapt blocks.*.** : Linear dora rank=8 alpha=16 init=error"),
                          example_inputs=lm.example_inputs, calib=calib, backend="eager")
    batch = _calib(n=1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(dora(**batch).logits, cm(**batch).logits, atol=1e-4, rtol=1e-4)


def test_adapters_train_and_save_load_bit_identical(compiled, tmp_path):
    lm, calib, cm = compiled
    cm.save(tmp_path / "a")
    back = slimfx.load(tmp_path / "a", backend="eager")
    batch = _calib(n=1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, cm(**batch).logits)
    trained = copy.deepcopy(back)
    params = trained.adapter_parameters()
    assert params and all(p.requires_grad for p in params)
    trained(**batch).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)


def test_refused_without_a_quantize_before_it():
    with pytest.raises(SpecError) as e:
        slimfx.parse(_policy("adapt blocks.*.attn.q lora init=error"))
    assert e.value.kind == "illegal-order" and "nothing before line 2 quantizes" in e.value.message


def test_refused_with_merge_true():
    with pytest.raises(SpecError) as e:
        slimfx.parse(_policy(QUANT, "adapt blocks.*.attn.q lora init=error merge=true"))
    assert e.value.kind == "invalid-combination" and "merge=false" in e.value.hint


def test_refused_with_from():
    with pytest.raises(SpecError) as e:
        slimfx.parse(_policy(QUANT, 'adapt blocks.*.attn.q lora init=error from="x"'))
    assert e.value.kind == "invalid-combination"


def test_refused_for_a_target_no_rule_quantized():
    lm = tiny("llama", layers=2)
    policy = _policy("quantize blocks.*.attn.q int4 group=16", "adapt blocks.*.attn.{q,v} lora rank=4 init=error")
    with pytest.raises(SpecError) as e:
        slimfx.compile(lm.model, policy, example_inputs=lm.example_inputs, calib=_calib(), backend="eager")
    assert e.value.kind == "illegal-order" and "attn.v" in e.value.message and e.value.line == 3


def test_refused_without_calibration():
    lm = tiny("llama", layers=2)
    with pytest.raises(SpecError) as e:
        slimfx.compile(lm.model, _policy(QUANT, "adapt blocks.*.attn.q lora rank=4 init=error"),
                       example_inputs=lm.example_inputs, backend="eager")
    assert e.value.kind == "missing-value" and "calib" in e.value.hint


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_targets_left_in_full_precision_do_not_count_as_error_left():
    """`a` is kept in fp32 and has no error; counted as 100% left it made the note read 71.6% where
    the one quantized target's adapter left 43%."""
    torch.manual_seed(0)
    model, ex = _Two(), {"x": torch.randn(4, 32, 64)}
    calib = [{"x": torch.randn(4, 32, 64)} for _ in range(4)]
    both = slimfx.compile(model, "quantize a keep\nquantize b int4 group=16\nadapt {a,b} lora rank=4 init=error",
                          example_inputs=ex, calib=calib).report.rules[-1]
    alone = slimfx.compile(model, "quantize b int4 group=16\nadapt b lora rank=4 init=error",
                           example_inputs=ex, calib=calib).report.rules[-1]
    assert both.details["output_error_left"] == pytest.approx(alone.details["output_error_left"], rel=1e-6)
    assert 0 < alone.details["output_error_left"] < 0.8
    assert "mean over 1 target; 1 left in full precision has no error" in " ".join(both.notes)
    none = slimfx.compile(model, "quantize {a,b} keep\nadapt {a,b} lora rank=4 init=error",
                          example_inputs=ex, calib=calib).report.rules[-1]
    assert none.details["output_error_left"] is None
    assert "none of the 2 targets has a quantization error" in " ".join(none.notes)
