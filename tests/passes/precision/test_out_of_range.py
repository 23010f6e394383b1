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
    (torch.bfloat16, 1e5, "precision ** : Linear choose {fp16, int8} budget avg_bits<=16 by output_mse",
     "2 cannot be stored as fp16"),
    (torch.float32, 1e9, "quantize ** : Linear int4 group=16", "2 cannot be stored as int4 group=16: a weight group "
                                                             "needs a scale above 65504"),
])
def test_a_weight_the_format_cannot_hold_is_refused_naming_its_linear(dtype, big, rule, says):
    model, inputs = _model(dtype, big)
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(model, rule, example_inputs=inputs, calib=[inputs] * 2)
    assert e.value.kind == "out-of-range" and e.value.line == 1 and says in e.value.message
    assert "keep 2" in e.value.hint
    # a budget offered the other formats already: it said "offer a format that holds it (bf16, …)"
    offer = "take fp16 out of the choices" if rule.startswith("precision") else "offer a format that holds it"
    assert offer in e.value.hint


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
