"""`plan` refuses the heals compile refuses, with compile's message, before any weight changes:
folds into a weight a rule above protected, reformatted or adapted, or below a map; a LoRA heal
with no free linear near its cuts, or one that could not merge into quantized weights (refused
after its whole training, before). And a block that holds an earlier compile's heal map is not
removed (the map went with it, silently)."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx import SpecError
from slimfx.models import tiny
from slimfx.passes.collapse import heal

from collapse_ref import mapped_at, without_layers
from output_compare import max_diff, outputs

LORA = "heal method=lora distill=true steps=1"


def _refusal(run, lm, rules):
    with pytest.raises(SpecError) as e:
        run(lm, rules)
    (d,) = e.value.diagnostics
    return d.kind, d.line, d.message


@pytest.mark.parametrize("middle, last, kind, says", [
    ("quantize blocks.*.mlp.down int8", "heal method=linear fold=true", "illegal-order", "stored that weight quantized"),
    ("adapt blocks.*.mlp.down lora", "heal method=linear fold=true", "illegal-order", "an adapter sits on it"),
    ("heal method=linear", "heal method=linear fold=true", "illegal-order", "already put a map at this cut"),
    ("keep blocks.*.mlp.down", "heal method=linear fold=true", "invalid-combination", "a `keep` rule protects it"),
    ("adapt blocks[1:3].** : Linear lora", LORA, "unsupported", "found no linear without an adapter"),
    (f"{LORA} merge=false", LORA, "unsupported", "found no linear without an adapter"),
    ("keep blocks[1:3]", LORA, "unsupported", "`keep` protects 14 of them"),
    ("quantize blocks[1:3].** : Linear int8", LORA, "illegal-order", "cannot merge its adapters"),
])
def test_plan_refuses_the_heal_compile_refuses_with_its_message(middle, last, kind, says):
    lm = tiny("llama", layers=5)
    rules = f"drop blocks[2]\n{middle}\n{last}"
    planned = _refusal(slimfx.plan, lm, rules)
    assert planned[:2] == (kind, 3) and says in planned[2]
    assert _refusal(lambda m, p: slimfx.compile(m, p, calib=[lm.example_inputs]), lm, rules)[:2] == (kind, 3)


def test_a_lora_heal_that_cannot_merge_is_refused_by_compile_before_it_trains(monkeypatch):
    """A budget with a `keep` candidate may leave the weights float, so plan lets it pass; compile
    asks merge before the training that used to run in full first."""
    lm = tiny("llama", layers=5)

    def no_training(*args, **kwargs):
        raise AssertionError("the heal trained before it found it cannot merge")

    monkeypatch.setattr(heal, "train", no_training)
    rules = ("drop blocks[2]\nprecision blocks[1:3].** : Linear choose {keep, int8} budget avg_bits<=9 by output_mse\n"
             + LORA)
    assert slimfx.plan(lm, rules)
    kind, line, message = _refusal(lambda m, p: slimfx.compile(m, p, calib=[lm.example_inputs]), lm, rules)
    assert (kind, line) == ("illegal-order", 3) and "cannot merge its adapters" in message and "quantized" in message


def test_a_heal_over_weights_an_earlier_compile_quantized_blames_that_compile():
    """It said "by a rule above", "put the heal above the `quantize`": the policy has no such rule."""
    lm = tiny("llama", layers=5)
    cm = slimfx.compile(lm, "quantize blocks.*.** : Linear int8")
    for rules, says, hint in ((f"drop blocks[2]\n{LORA}", "is quantized or stored in another dtype by an earlier "
                               "compile", "write merge=false to keep them beside the quantized weights"),
                              ("drop blocks[2]\nheal method=linear fold=true", "an earlier compile stored that "
                               "weight quantized", "write fold=false (a map on the stream)")):
        for run in (slimfx.plan, lambda m, p: slimfx.compile(m, p, calib=[lm.example_inputs])):
            with pytest.raises(SpecError) as e:
                run(cm, rules)
            assert e.value.kind == "unsupported" and says in e.value.message and e.value.hint == hint


@pytest.mark.parametrize("last", [LORA, "heal method=linear fold=true"])
def test_a_heal_over_weights_a_rule_left_in_their_own_half_dtype_is_not_refused(last):
    """`quantize … bf16` on a bf16 model leaves the weights as they are (float, foldable and
    mergeable): plan and compile refused the heal as if they were quantized."""
    lm = tiny("llama", layers=5)
    model = lm.model.to(torch.bfloat16)
    rules = f"drop blocks[2]\nquantize blocks.*.** : Linear bf16\n{last}"
    assert slimfx.plan(model, rules, example_inputs=lm.example_inputs)
    assert slimfx.compile(model, rules, example_inputs=lm.example_inputs, calib=[lm.example_inputs])


def test_a_lora_heal_after_a_search_is_not_refused_for_the_cuts_the_search_made():
    """Bound again after the search, the graph no longer shows the search's cut: the heal saw only
    `drop blocks[0]`'s, whose neighbour `keep` protects, and was refused after the search."""
    lm = tiny("llama", layers=6)
    cm = slimfx.compile(lm, f"drop blocks[3:6] auto(count=1)\nkeep blocks[1]\ndrop blocks[0]\n{LORA}",
                        calib=[lm.example_inputs])
    assert cm.report.rules[3].details["adapters"] == 7  # beside the search's cut


def test_a_block_that_holds_an_earlier_heals_map_is_not_removed():
    """`compile(cm, "drop blocks[2]")` after `drop blocks[2]` + `heal method=linear` removed the
    block in front of which the map sat, and the map with it: the output was the model without
    both blocks and no map (0.28 off the model with it), the map's tensor left behind unused."""
    lm = tiny("llama", layers=6)
    cm = slimfx.compile(lm, "drop blocks[2]\nheal method=linear", calib=[lm.example_inputs])
    for run in (slimfx.plan, lambda m, p: slimfx.compile(m, p, calib=[lm.example_inputs])):
        for rules in ("drop blocks[2]", "drop blocks[2:4]", "collapse blocks[1:3]"):
            kind, _, message = _refusal(run, cm, rules)
            assert kind == "unsupported" and message.startswith(
                "model.layers.3 begins with the map an earlier `heal method=linear` put at its cut "
                "(model.layers.heal_map_3)"), rules
    # the auto search leaves it out; another block goes, the map stays in front of layers.3
    chosen = slimfx.compile(cm, "drop blocks auto(count=3)", calib=[lm.example_inputs])
    assert "model.layers.3" in [b.path for b in chosen.graph.blocks]
    smaller = slimfx.compile(cm, "drop blocks[4]")  # model.layers.5
    t = cm.program.get_submodule("model.layers").heal_map_3.T  # stored as a linear's weight, Tᵀ
    reference = mapped_at(without_layers(lm.model, "model.layers", {2, 5}), "model.layers", 2, t)
    assert max_diff(outputs(smaller, lm.example_inputs), outputs(reference, lm.example_inputs)) < 1e-4
