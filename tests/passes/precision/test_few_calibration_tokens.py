"""A precision rule whose statistics read fewer calibration tokens than its widest target has
inputs says so in the report: `calib=["a text", "another text"]` (4 tokens) compiled GPTQ and a
budget without a word, on Hessians of rank 4 at most."""
from __future__ import annotations

import pytest

import slimfx
from slimfx.models import tiny

FEW = ["a text", "another text"]  # a handful of tokens: fewer than tiny llama's 64- and 128-wide inputs
RULES = {
    "gptq": "quantize blocks.*.** : Linear int4 group=16 method=gptq",
    "gptq, block by block": "quantize blocks.*.** : Linear int4 group=16 method=gptq sequential=true",
    "budget": "precision blocks.*.** : Linear choose {int8, int4 group=16} budget avg_bits<=6 by output_mse",
}
SAID = "calibration tokens, fewer than the 128 inputs of its widest target"


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_few_calibration_tokens_are_said_and_enough_are_not(rule):
    lm = tiny("llama")
    notes = slimfx.compile(lm, rule, calib=FEW).report.rules[0].notes
    assert any(SAID in n for n in notes), notes
    assert not any(SAID in n for n in slimfx.compile(lm, rule).report.rules[0].notes)  # the default 3,072
