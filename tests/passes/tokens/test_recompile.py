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


MERGED = "tokens unpad\ntokens after blocks[1] merge ratio=0.5 restore=true"


@pytest.fixture(scope="module")
def merged():
    lm = tiny("bert", layers=4)
    example = _batch([12, 8, 5], 12, 0)
    return lm, example, slimfx.compile(lm.model, MERGED, example_inputs=example, calib=[example])


@pytest.mark.parametrize("policy", ["tokens unpad", "tokens after blocks[2] merge ratio=0.5 restore=true",
                                    "tokens after blocks[2] prune keep=0.5 restore=true",
                                    "tokens after blocks[0] merge ratio=0.5 restore=true"])
def test_token_rules_onto_a_model_that_has_some_are_refused_by_name(merged, policy):
    """Its copied graph keeps no record of which values are packed: a second unpad packed packed
    values (a raw RuntimeError on the first call), a merge ran the causal probe on merged rows (a raw
    IndexError) or was told to put `tokens unpad` above it, which the model already has."""
    _, example, cm = merged
    with pytest.raises(slimfx.SpecError, match=r"(?s)compiled before with token rules.*compile the original model "
                                               r"with all its token rules in one policy"):
        slimfx.compile(cm, policy, calib=[example])


def test_quantize_onto_a_merged_model_equals_it_in_the_same_policy(merged):
    lm, example, cm = merged
    rule = "quantize blocks.*.** : Linear int8"
    again = slimfx.compile(cm, rule, calib=[example])
    direct = slimfx.compile(lm.model, f"{MERGED}\n{rule}", example_inputs=example, calib=[example])
    batch = _batch([11, 3, 7], 11, 5)
    with torch.no_grad():
        got, want = again(**batch).last_hidden_state, direct(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_plan_says_token_rules_onto_a_model_that_has_some_are_refused(merged):
    """`slimfx plan` bound such a rule without a word; only compile refused it."""
    _, _, cm = merged
    with pytest.raises(slimfx.SpecError, match=r"<policy>:2:1: .*compiled before with token rules"):
        slimfx.plan(cm, "quantize blocks.*.** : Linear int8\ntokens after blocks[2] prune keep=0.5")
