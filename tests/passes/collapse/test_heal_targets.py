"""What `heal` maps each cut to: what left the gap in the model as the policy's first
`collapse`/`drop` found it, however many rules made the gap (checked against the fit applied by
hand to the Hugging Face model), and what the removals keep for it."""
from __future__ import annotations

import pytest

import slimfx
from slimfx.passes.collapse.fit import fit_map

from collapse_ref import eager_tiny, laco_merged, layer_streams, mapped_at, without_layers
from output_compare import max_diff, outputs


def test_a_drop_spanning_an_earlier_gap_makes_one_cut_healed_as_one():
    """`drop blocks[2:4]` then `drop blocks[1:3]` (the renumbered blocks 1 and 4, on both sides of
    the first gap): one gap of blocks 1–4, in model order, between 0 and 5. What enters it is
    block 0's output; what left it is block 4's output in the model as the first rule found it
    (it was taken from the model without 2–3). It raised ValueError (block 1, gone, was still the
    first gap's neighbour)."""
    lm = eager_tiny(layers=6, seed=25)
    ids = lm.example_inputs
    cm = slimfx.compile(lm, "drop blocks[2:4]\ndrop blocks[1:3]\nheal method=linear", calib=[ids])
    (cut,) = cm.report.rules[2].details["cuts"]
    assert cut["removed"] == [f"model.layers.{i}" for i in (1, 2, 3, 4)]
    target = layer_streams(lm.model, "model.layers", ids)[5]
    dropped = without_layers(lm.model, "model.layers", {1, 2, 3, 4})
    fit = fit_map([layer_streams(dropped, "model.layers", ids)[1]], [target])
    reference = mapped_at(dropped, "model.layers", 1, fit.map)
    assert max_diff(outputs(cm, ids), outputs(reference, ids)) < 1e-4
    lora = slimfx.compile(lm, "drop blocks[2:4]\ndrop blocks[1:3]\nheal method=lora steps=1 merge=false",
                          calib=[ids])
    assert lora.report.rules[2].details["blocks"] == ["model.layers.0", "model.layers.5"]


@pytest.mark.parametrize("one_rule, two_rules", [
    ("drop blocks[3:5]", "drop blocks[3]\ndrop blocks[3]"),  # one gap, made by two rules
    ("drop blocks[2:4]", "drop blocks[3]\ndrop blocks[2]"),  # the second run ends where the first gap starts
    ("drop {blocks[2], blocks[5]}", "drop blocks[2]\ndrop blocks[4]"),  # the later gap after the earlier
    ("drop {blocks[2], blocks[5]}", "drop blocks[5]\ndrop blocks[2]"),
])
def test_a_heal_maps_to_the_same_targets_however_many_rules_made_the_cuts(one_rule, two_rules):
    """Each map sends the stream entering its gap to what left the gap in the model as the first
    `drop` found it: the second rule's target was measured on the model the first had cut already
    (KL to the original 0.0068 for `drop blocks[3]` twice against 0.0032 for `drop blocks[3:5]`)."""
    lm = eager_tiny(layers=8, seed=27)
    ids = lm.example_inputs
    one = slimfx.compile(lm, f"{one_rule}\nheal method=linear", calib=[ids])
    two = slimfx.compile(lm, f"{two_rules}\nheal method=linear", calib=[ids])
    assert one.report.rules[-1].details["cuts"] == two.report.rules[-1].details["cuts"]
    assert max_diff(outputs(one, ids), outputs(two, ids)) < 1e-4


@pytest.mark.parametrize("policy, recorded", [
    ("drop blocks[1]", set()),  # no heal after it: nothing reads a record
    ("drop blocks[1]\nheal method=linear", {"model.layers.1"}),  # only the gap's end: no removal follows
    ("drop blocks[1]\nheal method=linear\nquantize blocks[0].** : Linear int8", {"model.layers.1"}),
    ("drop blocks[1]\ndrop blocks[3]\nheal method=linear", {f"model.layers.{i}" for i in range(1, 6)}),  # each after
])
def test_a_removal_keeps_every_later_blocks_output_only_when_another_removal_follows(policy, recorded):
    """Kept for every block after the cut, SmolLM2's 18 streams at 25k calibration tokens are 1.2 GB.
    What the cuts hold is read when the pipeline ends, or when a heal comes (which empties them)."""
    from slimfx.dsl.parser import parse
    from slimfx.passes import pipeline
    from slimfx.passes.bind import bind
    from slimfx.passes.capture import capture
    from slimfx.passes.context import Context

    lm = eager_tiny(layers=6, seed=27)
    graph = capture(lm.model, lm.example_inputs)
    ctx, held = Context(calib=[lm.example_inputs]), []
    heal = pipeline.PASSES[slimfx.dsl.ast.Heal]

    def spy(graph, bound, ctx):
        held.append({path for cut in ctx.cuts for path in cut.record})
        return heal(graph, bound, ctx)

    pipeline.PASSES[slimfx.dsl.ast.Heal] = spy
    try:
        pipeline.run_pipeline(graph, bind(graph, parse(f"policy p {{\n{policy}\n}}\n").policy()), ctx)
    finally:
        pipeline.PASSES[slimfx.dsl.ast.Heal] = heal
    assert (held[0] if held else {path for cut in ctx.cuts for path in cut.record}) == recorded


def test_a_drop_after_a_collapse_maps_to_the_model_before_the_merge():
    """`collapse blocks[1:3]` then `drop blocks[2]` (block 3, after the merged block 1): the map at
    the second gap sends what enters it to block 3's output in the original model, not in the
    merged one."""
    lm = eager_tiny(layers=6, seed=28)
    ids = lm.example_inputs
    original = layer_streams(lm.model, "model.layers", ids)
    merged = without_layers(laco_merged(lm.model, "model.layers", 1, [2]), "model.layers", {2})  # 0, 1*, 4, 5
    fit = fit_map([layer_streams(merged, "model.layers", ids)[2]], [original[4]])
    reference = mapped_at(merged, "model.layers", 2, fit.map)
    cm = slimfx.compile(lm, "collapse blocks[1:3]\ndrop blocks[2]\nheal method=linear", calib=[ids])
    assert [c["removed"] for c in cm.report.rules[-1].details["cuts"]] == [["model.layers.2", "model.layers.3"]]
    assert max_diff(outputs(cm, ids), outputs(reference, ids)) < 1e-4
