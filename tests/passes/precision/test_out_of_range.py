"""A weight the chosen format cannot hold is refused at the rule, naming the linear: `fp16` of a
bf16 weight past 65504 was stored as inf silently (every output inf); a budget offering fp16 said
"costs … must be finite numbers"; an int4 group whose scale passes fp16's range named no linear."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfx


def _model(dtype, big):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).to(dtype)
    with torch.no_grad():
        m[2].weight[0, 0] = big
    return m, {"input": torch.randn(2, 64, dtype=dtype)}


@pytest.mark.parametrize("dtype, big, rule, says", [
    (torch.bfloat16, 1e5, "quantize ** : Linear fp16", "2 cannot be stored as fp16: weights up to 99840 exceed "
                                                      "fp16's largest, 65504"),
    (torch.float32, 1e9, "quantize ** : Linear int4 group=16", "2 cannot be stored as int4 group=16: a weight group "
                                                             "needs a scale above 65504"),
])
def test_a_weight_the_format_cannot_hold_is_refused_naming_its_linear(dtype, big, rule, says):
    model, inputs = _model(dtype, big)
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(model, rule, example_inputs=inputs, calib=[inputs] * 2)
    assert e.value.kind == "out-of-range" and e.value.line == 1 and says in e.value.message
    assert "keep 2" in e.value.hint and "offer a format that holds it" in e.value.hint


def _rtn(w: torch.Tensor, fmt: str, group: int | None) -> torch.Tensor:
    from slimfx.runtime.formats import dequantize, from_rule, quantize_rtn
    return dequantize(quantize_rtn(w.float(), from_rule(fmt, group))).to(w.dtype)


@pytest.mark.parametrize("choices, metric", [("int8, int4 group=16", "avg_bits<=6"),
                                             ("int4 group=16, int8", "bytes<=2KiB")])  # each index mapped back
def test_a_budget_chooses_among_the_formats_that_hold_each_weight(choices, metric):
    """A budget refused the whole rule when one offered format could not hold one weight (int4
    group=16 needs a scale past fp16's range for a weight of 1e6), although int8 per channel
    holds it: that weight now takes int8, the rest are solved as before, and the report says so."""
    model, inputs = _model(torch.float32, 1e6)
    cm = slimfx.compile(model, f"precision ** : Linear choose {{{choices}}} budget {metric} "
                        "by output_mse", example_inputs=inputs, calib=[inputs] * 2, backend="eager")
    rule = cm.report.rules[0]
    assert rule.details["choices"] == {"0": "int4 group=16", "2": "int8 per-channel"}
    assert any(n.startswith("2: int4 group=16 cannot hold its weights (a weight group needs a scale above 65504")
               for n in rule.notes)
    # against the formats applied by hand (float activations: the reference ops): a choice mapped
    # to another format's encoding is int8's or int4's error away, far above 1e-5
    ref = _model(torch.float32, 1e6)[0]
    with torch.no_grad():
        ref[0].weight.copy_(_rtn(ref[0].weight, "int4", 16))
        ref[2].weight.copy_(_rtn(ref[2].weight, "int8", None))
        want = ref(inputs["input"])
        assert torch.allclose(cm(**inputs), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_gptq_scoring_block_by_block_chooses_among_the_formats_that_hold_each_weight():
    model, inputs = _model(torch.float32, 1e6)
    cm = slimfx.compile(model, "precision ** : Linear choose {int4 group=16, int8} budget avg_bits<=6 by output_mse "
                        "method=gptq", example_inputs=inputs, calib=[inputs] * 2)
    assert cm.report.rules[0].details["choices"] == {"0": "int4 group=16", "2": "int8 per-channel"}
    assert torch.isfinite(cm(**inputs)).all()


def test_the_report_gives_each_format_left_out_its_own_reason():
    model, inputs = _model(torch.bfloat16, 1e6)
    rule = slimfx.compile(model, "precision ** : Linear choose {fp16, int4 group=16, int8} budget avg_bits<=16 "
                          "by output_mse", example_inputs=inputs, calib=[inputs] * 2).report.rules[0]
    (note,) = [n for n in rule.notes if n.startswith("2: ")]
    assert note.startswith("2: fp16 cannot hold its weights (weights up to 999424 exceed fp16's largest, 65504); "
                           "int4 group=16 cannot hold its weights (a weight group needs a scale above 65504"), note
    assert rule.details["choices"]["2"] == "int8 per-channel"


def test_a_weight_no_offered_format_holds_is_refused_naming_each_format():
    model, inputs = _model(torch.float32, 1e9)
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(model, "precision ** : Linear choose {int8, int4 group=16} budget avg_bits<=6 by output_mse",
                       example_inputs=inputs, calib=[inputs] * 2)
    assert e.value.kind == "out-of-range" and e.value.line == 1
    assert e.value.message.startswith("2 cannot be stored in any offered format (int8 per-channel, int4 group=16: a "
                                      "weight group needs a scale above 65504")
    assert "keep 2" in e.value.hint and "offer bf16 among the choices" in e.value.hint


def test_a_budget_only_the_larger_format_can_meet_says_so():
    """Every target at its smallest format that holds it is over the budget: the figure counts
    the int8 the large weight must take, and says so."""
    model, inputs = _model(torch.float32, 1e6)
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(model, "precision ** : Linear choose {int8, int4 group=16} budget avg_bits<=5.1 "
                       "by output_mse", example_inputs=inputs, calib=[inputs] * 2)
    assert e.value.kind == "out-of-range" and "(every target at its smallest candidate that holds it)" \
        in e.value.message


def test_within_range_it_compiles_as_before():
    model, inputs = _model(torch.bfloat16, 6e4)
    cm = slimfx.compile(model, "quantize ** : Linear fp16", example_inputs=inputs)
    assert torch.isfinite(cm(**inputs)).all()


@pytest.mark.parametrize("rule", ["quantize ** : Linear int4 group=16",
                                  "quantize ** : Linear int4 group=16 method=gptq",
                                  "precision ** : Linear choose {int8, int4} budget avg_bits<=6 by output_mse",
                                  "quantize ** : Linear fp16", "quantize ** : Linear bf16"])
def test_a_nan_weight_is_refused_naming_its_linear(rule):
    """A raw ValueError ("weight holds NaN or inf") that named neither the linear nor the rule. The
    half formats stored it as it was: max(|w|) is NaN, so their range check let a 1e6 beside it
    become inf."""
    model, inputs = _model(torch.float32, float("nan"))
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(model, rule, example_inputs=inputs, calib=[inputs] * 2)
    assert e.value.line == 1 and "2 cannot be quantized: its weight holds NaN or inf" in e.value.message
    assert "keep 2" in e.value.hint


@pytest.mark.parametrize("rule", ["precision ** : Linear choose {int8, int4} budget avg_bits<=6 by output_mse",
                                  "quantize ** : Linear int4 group=16 clip=output",
                                  "quantize ** : Linear int4 group=16 method=gptq"])
def test_calibration_inputs_of_nan_or_inf_are_refused_by_every_method_that_reads_them(rule):
    """Only GPTQ checked: RTN scoring gave the budget solver NaN costs (a raw ValueError naming no
    linear), and clip=output kept every group's full range without a word."""
    model, inputs = _model(torch.float32, 1.0)
    bad = {"input": inputs["input"].clone()}
    bad["input"][0, 3] = float("inf")
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(model, rule, example_inputs=inputs, calib=[bad])
    assert e.value.line == 1 and "0 cannot be quantized: its inputs on the calibration batches hold NaN or inf" \
        in e.value.message


def test_fisher_scoring_on_inputs_of_inf_is_refused_at_the_rule():
    """An fp16 model overflowing on some text: `by fisher` gave the solver NaN costs too."""
    from slimfx.models import tiny
    lm = tiny("llama", layers=1)
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[5] = float("inf")
    batch = {k: v.clone() for k, v in lm.example_inputs.items()}
    batch["input_ids"][0, 2] = 5
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(lm, "precision blocks.*.** : Linear choose {int8, int4} budget avg_bits<=6 by fisher",
                       calib=[batch])
    assert e.value.line == 1 and "its inputs on the calibration batches hold NaN or inf" in e.value.message
