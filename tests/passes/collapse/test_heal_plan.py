"""`plan` refuses the heals compile refuses, with compile's message, before any weight changes:
folds into a weight a rule above protected, reformatted or adapted, or below a map; a LoRA heal
with no free linear near its cuts, or one that could not merge into quantized weights (refused
after its whole training, before). And a block that holds an earlier compile's heal map is not
removed (the map went with it, silently)."""
from __future__ import annotations

import pytest

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
    """A model quantized by an earlier compile: plan knows its weights, and the heal asks merge
    before the training that used to run in full first."""
    lm = tiny("llama", layers=5)
    cm = slimfx.compile(lm, "quantize blocks.*.** : Linear int8")

    def no_training(*args, **kwargs):
        raise AssertionError("the heal trained before it found it cannot merge")

    monkeypatch.setattr(heal, "train", no_training)
    for run in (slimfx.plan, lambda m, p: slimfx.compile(m, p, calib=[lm.example_inputs])):
        kind, line, message = _refusal(run, cm, f"drop blocks[2]\n{LORA}")
        assert (kind, line) == ("illegal-order", 2) and "cannot merge its adapters" in message and "quantized" in message
    assert slimfx.plan(lm, "drop blocks[2]\nquantize blocks[1:3].** : Linear keep\n" + LORA)  # `keep` leaves the weight


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
