"""A `quantize … method=gptq` rule's options reach GPTQ (passes/precision/encode.py, targets.py):
the compiled codes and scales equal `gptq()` called here with the option, on Hessians taken with
hooks on the Hugging Face model. A policy that dropped `act_order`, `clip` or `damp` on its way
to GPTQ compiled and passed every other test (the policy tests compared with encode() itself)."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.models import tiny
from slimfx.passes.precision.gptq import gptq
from slimfx.runtime.formats import QuantFormat

from passes_tiny import linear_input_hessians, token_batches


@pytest.fixture(scope="module")
def setup():
    lm = tiny("llama")
    calib = token_batches(3, 2, 12, 5)
    return lm, calib, linear_input_hessians(lm.model, calib)


@pytest.mark.parametrize("option, kwargs", [("act_order=true", dict(act_order=True)), ("clip=mse", dict(clip="mse")),
                                            ("clip=output", dict(clip="output")), ("damp=0.3", dict(damp=0.3))])
def test_each_gptq_option_reaches_every_target(setup, option, kwargs):
    lm, calib, hessians = setup
    rule = f"quantize blocks.*.** : Linear int4 group=32 method=gptq sequential=false {option}"
    cm = slimfx.compile(lm.model, rule, example_inputs=lm.example_inputs, calib=calib, backend="eager")
    changed = 0
    for path, h in hessians.items():
        w = lm.model.get_submodule(path).weight.detach()
        want = gptq(w, h, QuantFormat(4, 32, True), **kwargs)
        got = cm.program.get_submodule(path)
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales), path
        changed += not torch.equal(gptq(w, h, QuantFormat(4, 32, True)).qweight, want.qweight)  # the defaults
    assert changed, f"{option} changed no linear's codes here: the test could not tell it was dropped"
