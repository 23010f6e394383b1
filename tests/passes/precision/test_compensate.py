"""Error adapters fitted during the sequential GPTQ sweep (passes/precision/compensate.py), when
`adapt … init=error` comes right after the quantize rule: against a direct layer-by-layer loop
written here on the Hugging Face model (GPTQ a group of linears on the inputs the model computes
now, both aimed at what the original layer computed on the original model's inputs — plus, for
o_proj and down_proj, the residual stream's drift where their output joins it — fit each one's
adapter on the same H, put Ŵ + s·B·A in, go on)."""
from __future__ import annotations

import copy

import pytest
import torch

import slimfx
from slimfx.models import tiny
from slimfx.passes.lowrank import drift_target, error_adapter
from slimfx.passes.precision.compensate import ErrorCorrections, few_rows_note
from slimfx.passes.precision.gptq import gptq
from slimfx.runtime.formats import QuantFormat, dequantize, unpack

from passes_tiny import assert_same_codes, token_batches

FMT = QuantFormat(2, 16, True)
QUANT = "quantize blocks.*.** : Linear int2 group=16 method=gptq"
ADAPT = "adapt blocks.*.** : Linear lora rank=4 alpha=8 init=error"
LAYERS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _calib(n=4, rows=4, length=16, seed=0):
    return token_batches(n, rows, length, seed)


def _policy(*rules: str) -> str:
    return "policy p {\n" + "\n".join(rules) + "\n}"


def _direct(model, calib, rank: int, scale: float, dtype: torch.dtype):
    """(model, codes, s·B·A per linear): group by group of each block, hooks gather the inputs on
    the model as it is now (H) and on the original model at the same rows (C = E[x_ref xᵀ]); for
    o_proj and down_proj, whose outputs are added to the residual stream, also that stream's drift
    there against the input (D = E[(r_ref − r) xᵀ]: r is the block's input for o_proj, the block's
    input plus o_proj's output for down_proj); GPTQ of drift_target(W, H, C, D) on H, the error
    adapter aimed at it on the same H, then Ŵ + s·B·A in its place."""
    original = copy.deepcopy(model).eval()
    model = copy.deepcopy(model).eval()
    codes, corrections = {}, {}
    for i, layer in enumerate(model.model.layers):
        for group in LAYERS:
            now, ref = _Seen(layer, group[0]), _Seen(original.model.layers[i], group[0])
            with torch.no_grad():
                for batch in calib:
                    model(**batch)
                    original(**batch)
            now.remove(), ref.remove()
            x, x_ref = now.rows("x"), ref.rows("x")
            H, C = x.T @ x / x.shape[0], x_ref.T @ x / x.shape[0]
            D = None
            if group[0] in ("self_attn.o_proj", "mlp.down_proj"):
                r, r_ref = now.rows("h"), ref.rows("h")
                if group[0] == "mlp.down_proj":
                    r, r_ref = r + now.rows("o"), r_ref + ref.rows("o")
                D = (r_ref - r).T @ x / x.shape[0]
            for n in group:
                m = layer.get_submodule(n)
                w = m.weight.detach().clone()
                aim = drift_target(w, H, C, D=D)
                qw = gptq(aim.float(), H, FMT)
                w_hat = dequantize(qw)
                fit = error_adapter(aim, w_hat, H, rank, scale, dtype)
                path = f"model.layers.{i}.{n}"
                codes[path] = unpack(qw.qweight, 2, m.in_features)
                corrections[path] = scale * fit.B.float() @ fit.A.float()
                m.weight.data.copy_(w_hat + corrections[path])
    return model, codes, corrections


class _Seen:
    """Hooks on one decoder layer: the input x of the linear `name` reads, the residual stream
    entering the layer (h) and o_proj's output (o), each batch's rows kept."""

    def __init__(self, layer, name: str):
        self.seen = {"x": [], "h": [], "o": []}
        self.hooks = [
            layer.get_submodule(name).register_forward_hook(lambda mod, args, out: self.seen["x"].append(args[0])),
            layer.register_forward_pre_hook(lambda mod, args, kwargs: self.seen["h"].append(
                args[0] if args else kwargs["hidden_states"]), with_kwargs=True),
            layer.self_attn.o_proj.register_forward_hook(lambda mod, args, out: self.seen["o"].append(out))]

    def rows(self, what: str) -> torch.Tensor:
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in self.seen[what]]).double()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("dtype_name,dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_adapters_fitted_in_the_sweep_equal_a_direct_layer_by_layer_loop(dtype_name, dtype):
    lm = tiny("llama", layers=2)
    calib = _calib()
    cm = slimfx.compile(lm.model, _policy(QUANT, ADAPT + f" dtype={dtype_name}"), example_inputs=lm.example_inputs,
                        calib=calib, backend="eager")
    scale = 8 / 4
    direct, codes, corrections = _direct(lm.model, calib, 4, scale, dtype)
    assert_same_codes(cm, codes, 2)
    for path in codes:
        mod = cm.program.get_submodule(path)
        assert mod.lora_A.dtype == dtype
        ba = scale * mod.lora_B.float() @ mod.lora_A.float()
        # fp16: A and B fitted from float64 sums taken in another order may round to neighbouring
        # halves (2^-11 of an element), so the product agrees to 1e-3 of its largest entry
        close = 1e-4 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(ba, corrections[path], atol=close * float(corrections[path].abs().max()), rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(cm(**lm.example_inputs).logits, direct(**lm.example_inputs).logits,
                                   atol=1e-3, rtol=1e-3)
    quant, adapt = cm.report.rules
    assert quant.details["sequential"] == "by layer" and quant.details["error_adapters_fitted_for_line"] == 3
    assert quant.details["aimed_at_residual_stream"] == 4  # o_proj and down_proj of both blocks
    rows = sum(b["input_ids"].numel() for b in calib)  # 256, below 4 per feature of the widest input
    assert any(f"regression on {rows:,} calibration rows" in n for n in quant.notes)
    assert adapt.details["init"] == "error" and 0 < adapt.details["output_error_left"] < 1
    assert adapt.details["fitted_in_gptq_sweep"] == 14 and any("fitted during the GPTQ sweep" in n
                                                               for n in adapt.notes)


def test_later_blocks_are_calibrated_on_the_adapters_before_them():
    """The second block's codes differ from GPTQ's without the adapters (true-sequential, the same
    sweep otherwise), and the first block's q/k/v, which see no adapter, do not."""
    lm = tiny("llama", layers=2)
    calib = _calib()
    with_fits = slimfx.compile(lm.model, _policy(QUANT, ADAPT), example_inputs=lm.example_inputs, calib=calib,
                               backend="eager").state_dict()
    alone = slimfx.compile(lm.model, _policy(QUANT + " true_sequential=true"), example_inputs=lm.example_inputs,
                           calib=calib, backend="eager").state_dict()
    first = "program.model.layers.0.self_attn.q_proj.qweight"
    assert torch.equal(with_fits[first], alone[first])
    later = [k for k in alone if k.startswith("program.model.layers.1.") and k.endswith("qweight")]
    assert len(later) == 7 and all(not torch.equal(with_fits[k], alone[k]) for k in later)


def test_only_a_directly_following_adapt_rule_is_fitted_in_the_sweep():
    """A rule between the two (here another quantize) may change the weights: the first rule's
    targets are then fitted by the adapt rule itself, the second's in its sweep, and both are the
    best rank-r corrections of what they end up correcting."""
    lm = tiny("llama", layers=2)
    calib = _calib()
    attn = "quantize blocks.*.attn.** : Linear int2 group=16 method=gptq"
    mlp = "quantize blocks.*.mlp.** : Linear int2 group=16 method=gptq"
    cm = slimfx.compile(lm.model, _policy(attn, mlp, ADAPT), example_inputs=lm.example_inputs, calib=calib,
                        backend="eager")
    first, second, adapt = cm.report.rules
    assert "error_adapters_fitted_for_line" not in first.details and first.details["sequential"] is True
    assert second.details["error_adapters_fitted_for_line"] == 4
    assert len(cm.adapters) == 14 and adapt.details["output_error_left"] < 1
    assert adapt.details["fitted_in_gptq_sweep"] == 6  # gate, up and down of both blocks


def test_a_note_asks_for_more_calibration_below_four_rows_per_input_feature():
    fits = ErrorCorrections({}, 2, None)
    assert few_rows_note(None, 10) == () and few_rows_note(fits, 10) == ()  # nothing fitted
    fits.widest = 100
    assert few_rows_note(fits, 4 * 100) == ()
    (note,) = few_rows_note(fits, 4 * 100 - 1)
    assert "399 calibration rows, for inputs up to 100 wide" in note and "more calibration" in note


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_target_given_a_half_format_stores_the_weight_it_was_aimed_at():
    """`a` goes to int2 and `b` to fp16 (its outlier column makes int2 costly there): b is encoded
    toward its drift target, which the sweep calibrated on, but fp16 stored b's own weight."""
    torch.manual_seed(0)
    model = _TwoLinears().eval()
    with torch.no_grad():
        model.b.weight.mul_(8)
        model.b.weight[:, 0] = 40.0
    calib = [{"x": torch.randn(256, 32)} for _ in range(2)]
    policy = ("precision {a,b} choose {fp16, int2 group=16} budget avg_bits<=9.5 by output_mse method=gptq\n"
              "adapt {a,b} lora rank=2 init=error")
    cm = slimfx.compile(model, policy, example_inputs={"x": torch.randn(4, 32)}, calib=calib)
    assert cm.report.rules[0].details["choices"] == {"a": "int2 group=16", "b": "fp16"}
    stored = cm.program.get_submodule("b").weight_fp16
    assert not torch.equal(stored, model.b.weight.detach().half())
    x = torch.randn(512, 32)
    with torch.no_grad():
        want = model(x)
        aimed = (cm(x=x) - want).norm()
        cm.program.get_submodule("b").weight_fp16 = model.b.weight.detach().half()  # b's own weight
        own = (cm(x=x) - want).norm()
    assert aimed < 0.99 * own
