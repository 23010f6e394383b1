"""Token rules compiled onto a CompiledModel (e.g. one whose trained adapters were merged): its
copied graph has fresh symbols for the batch and the sequence, not the ones its inputs were
captured with, and the pass found no batch or sequence dims. The result equals the same rules
compiled onto the original model."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.models import tiny

from test_prune import _batch


POLICIES = ["tokens unpad", "tokens unpad\ntokens after blocks[0] prune keep=0.5 restore=true",
            "tokens after blocks[0] prune keep=0.5"]
MERGE = "tokens unpad\ntokens after blocks[0] merge ratio=0.3 by=keys prop_attn=true"  # encoders only


@pytest.mark.parametrize("arch, policy", [(a, p) for a in ("llama", "bert") for p in POLICIES] + [("bert", MERGE)])
def test_token_rules_on_a_compiled_model_equal_them_on_the_original(arch, policy):
    lm = tiny(arch, layers=2)
    example = _batch([7, 4, 2], 7, 0, left=arch == "llama")
    direct = slimfx.compile(lm.model, policy, example_inputs=example, calib=[example])
    again = slimfx.compile(slimfx.compile(lm.model, "", example_inputs=example), policy, calib=[example])
    batch = _batch([5, 9, 3, 9], 9, 4, left=arch == "llama")
    with torch.no_grad():
        want, got = direct(**batch), again(**batch)
    for name in want.keys():
        assert torch.equal(got[name], want[name]), name
    if direct.kept_tokens is not None:
        assert torch.equal(again.kept_tokens["positions"], direct.kept_tokens["positions"])
