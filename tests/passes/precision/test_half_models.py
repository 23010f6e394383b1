"""Sizes on a bf16 model: `keep` stores a weight as the model holds it (16 bits), not as the fp32
copy the encoders read. Counted at 32 bits, `choose {keep, …} budget avg_bits<=16` quantized half
the linears of a bf16 model whose every weight already fit, the report said `keep` was 32
bits/weight, and `plan` refused a bytes budget compile could meet (biases counted at 4 bytes)."""
from __future__ import annotations

import torch
from torch import nn

import slimfx


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(37, 19), nn.Linear(19, 5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _bf16():
    torch.manual_seed(0)
    return TwoLinears().eval().to(torch.bfloat16), {"x": torch.randn(4, 37, dtype=torch.bfloat16)}


def _compile(rule):
    model, example = _bf16()
    calib = [{"x": torch.randn(8, 37, dtype=torch.bfloat16)}]
    return slimfx.compile(model, rule, example_inputs=example, calib=calib).report.rules[0]


def test_a_budget_every_weight_already_meets_keeps_them_all():
    report = _compile("precision {a,b} choose {keep, int4 group=16} budget avg_bits<=16 by output_mse")
    assert set(report.details["choices"].values()) == {"keep"}
    assert report.details["bits_per_weight"] == 16.0
    assert report.bytes_after == report.bytes_before


def test_keep_is_sixteen_bits_on_a_bf16_model():
    report = _compile("quantize {a,b} keep")
    assert report.details["bits_per_weight"] == 16.0
    assert report.bytes_after == report.bytes_before == 2 * (37 * 19 + 19 + 19 * 5 + 5)


def test_plan_counts_bf16_biases_and_kept_weights_at_two_bytes():
    model, example = _bf16()
    # int4 g16: codes (a row of 37 → 19 bytes, of 19 → 10) + one fp16 scale per group of 16
    weights_int4 = 19 * 19 + 19 * 3 * 2 + 5 * 10 + 5 * 2 * 2
    biases = 2 * (19 + 5)
    rule = f"precision {{a,b}} choose {{int8, int4 group=16}} budget bytes<={weights_int4 + biases} by output_mse"
    plan = slimfx.plan(model, rule, example_inputs=example)  # refused: "smallest achievable is 641 bytes"
    assert plan.rules[0].estimate.bytes_after == weights_int4 + biases
    report = _compile(rule)
    assert report.bytes_after == weights_int4 + biases
    keep = slimfx.plan(model, "quantize {a,b} keep", example_inputs=example).rules[0].estimate
    assert keep.bytes_after == keep.bytes_before == 2 * (37 * 19 + 19 + 19 * 5 + 5)


def test_quantize_to_the_dtype_a_weight_already_has_leaves_it_and_says_so():
    """`quantize … bf16` on a bf16 model re-stored every weight as it was, with no word, and the
    graph copied each one bf16 → bf16 before every call."""
    model, example = _bf16()
    cm = slimfx.compile(model, "quantize {a,b} bf16", example_inputs=example)
    (rule,) = cm.report.rules
    assert rule.notes == ("2 targets already bf16: left as they are",) and rule.bytes_after == rule.bytes_before
    assert not [n for n in cm.program.graph.nodes if n.op == "call_function" and "to_copy" in str(n.target)]
    with torch.no_grad():
        assert torch.equal(cm(**example), model(**example))
    fp16 = slimfx.compile(model, "quantize {a,b} fp16", example_inputs=example).report.rules[0]
    assert fp16.notes == () and fp16.details["bits_per_weight"] == 16.0  # another dtype: converted
