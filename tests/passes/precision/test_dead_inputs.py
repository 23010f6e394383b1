"""GPTQ zeroes the weight columns of inputs no calibration token activated (as the reference
does); the report names the linear and how many."""
from __future__ import annotations

import pytest
import torch

import slimfx


@pytest.mark.parametrize("rule", ["quantize lin int4 group=32 method=gptq",
                                  "precision lin choose {int8, int4 group=32} budget avg_bits<=8 by output_mse "
                                  "method=gptq"])
def test_inputs_no_calibration_token_activated_are_named_in_a_note(rule):
    """GPTQ zeroes their weight columns, as the reference does; calibration that never reached 8 of
    64 inputs gave those columns zero weight with no word (all 64: an all-zero weight)."""
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    calib = [{"x": torch.randn(4, 64)} for _ in range(3)]
    for b in calib:
        b["x"][:, :8] = 0
    cm = slimfx.compile(One(), rule, example_inputs={"x": torch.randn(2, 64)}, calib=calib)
    assert ("GPTQ zeroed the weights of inputs no calibration token activated (lin: 8 of 64)"
            in " ".join(cm.report.rules[0].notes))
    live = slimfx.compile(One(), rule, example_inputs={"x": torch.randn(2, 64)},
                          calib=[{"x": torch.randn(4, 64)} for _ in range(3)])
    assert not any("GPTQ zeroed" in n for n in live.report.rules[0].notes)
