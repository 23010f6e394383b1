"""`collapse` (passes/collapse/collapse.py, search.py): LaCo's merge against the same merge done by
hand on the Hugging Face modules; a block merged with its identical copy stays as it was; the
auto search's trials against a direct computation of their similarity."""
from __future__ import annotations


import pytest
import torch

import slimfx
from slimfx.models import tiny

from collapse_ref import laco_merged, layer_streams, mean_cos, tie_down_projections
from output_compare import max_diff, outputs


def _lm(layers: int, seed: int):
    return tiny("llama", layers=layers, seed=seed, attn_implementation="eager")


@pytest.fixture(scope="module")
def lm6():
    """Shared by the tests that leave it unchanged: captured once (compile's capture cache)."""
    return _lm(6, 13)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_explicit_collapse_is_the_laco_merge(arch):
    lm = tiny(arch, layers=5, seed=11, attn_implementation="eager")
    cm = slimfx.compile(lm, "collapse blocks[1:4]")
    path = cm.graph.blocks_path
    reference = laco_merged(lm.model, path, 1, [2, 3])
    assert max_diff(outputs(cm, lm.example_inputs), outputs(reference, lm.example_inputs)) < 1e-5
    assert [b.path for b in cm.graph.blocks] == [f"{path}.{i}" for i in (0, 1, 4)]
    assert cm.report.rules[0].details["into"] == f"{path}.1"


def test_merging_a_block_with_its_identical_copy_leaves_it_as_it_was():
    lm = _lm(4, 12)
    layers = lm.model.model.layers
    layers[2].load_state_dict(layers[1].state_dict())
    before = {k: v.clone() for k, v in layers[1].state_dict().items()}
    cm = slimfx.compile(lm, "collapse blocks[1:3]")
    merged = cm.program.get_submodule("model.layers.1").state_dict()
    for name, value in before.items():
        assert torch.equal(merged[name], value), name


def test_a_half_merge_of_two_blocks_rounds_once():
    """θ1 + (θ2 − θ1) is θ2 exactly when summed in float32; the delta rounded to bf16 first left
    a third of the values 1 ulp off."""
    import copy

    lm = _lm(4, 3)
    model = copy.deepcopy(lm.model).to(torch.bfloat16)
    cm = slimfx.compile(model, "collapse blocks[1:3]", example_inputs=lm.example_inputs)
    merged = cm.program.get_submodule("model.layers.1").state_dict()
    for name, value in model.model.layers[2].state_dict().items():
        assert torch.equal(merged[name], value), name


def _similarity_by_hand(model, keep: int, merged: list[int], inputs) -> float:
    """LaCo's trial measure: mean cosine of the last layer's output, merged model vs original."""
    original = layer_streams(model, "model.layers", inputs)[-1]
    trial = layer_streams(laco_merged(model, "model.layers", keep, merged), "model.layers", inputs)[-1]
    return mean_cos(trial, original)


def test_auto_search_trials_match_a_direct_computation(lm6):
    lm = lm6
    ids = lm.example_inputs
    cm = slimfx.compile(lm, "collapse blocks auto(count=2, span=2, threshold=0.01, interval=2)", calib=[ids])
    trials = cm.report.rules[0].details["trials"]
    # From the top: block 4 takes block 5; with interval 2 the next trial merges block 3 into 2.
    assert [(t["into"], t["merged"]) for t in trials] == [("model.layers.4", ("model.layers.5",)),
                                                          ("model.layers.2", ("model.layers.3",))]
    assert abs(trials[0]["similarity"] - _similarity_by_hand(lm.model, 4, [5], ids)) < 1e-5
    step1 = laco_merged(lm.model, "model.layers", 4, [5])
    original = layer_streams(lm.model, "model.layers", ids)[-1]
    step2 = layer_streams(laco_merged(step1, "model.layers", 2, [3]), "model.layers", ids)[-1]
    assert abs(trials[1]["similarity"] - mean_cos(step2, original)) < 1e-5
    assert len(cm.graph.blocks) == 4


def _laco_by_hand(model, ids, count: int, span: int, threshold: float) -> list[tuple]:
    """LaCo's Algorithm 1 on the Hugging Face modules (interval 1): l starts at L − C for the merge
    size C = min(span, count + 1) and moves down; C shrinks to what is left to remove."""
    original = layer_streams(model, "model.layers", ids)[-1]
    names = list(range(len(model.model.layers)))  # the original index of each layer left
    trials, removed, l = [], 0, len(names) - min(span, count + 1)
    while removed < count and l >= 0:
        c = min(span, count - removed + 1)
        l = min(l, len(names) - c)
        merged = laco_merged(model, "model.layers", l, list(range(l + 1, l + c)))
        sim = mean_cos(layer_streams(merged, "model.layers", ids)[-1], original)
        trials.append((names[l], tuple(names[l + 1:l + c]), sim >= threshold))
        if sim >= threshold:
            model, names, removed = merged, names[:l + 1] + names[l + c:], removed + c - 1
        l -= 1
    return trials


@pytest.mark.parametrize("count, threshold", [(1, 0.01), (2, 0.01), (2, 0.999)])
def test_auto_search_starts_at_the_top_for_the_merge_size_it_uses(count, threshold):
    """With span=4 (the default) and count=1 the search started at L − 4 and merged block 5 into 4:
    the top two blocks, which LaCo (starting at L − C for its merge size C = 2) tries first, never."""
    lm = _lm(8, 5)
    ids = lm.example_inputs
    cm = slimfx.compile(lm, f"collapse blocks auto(count={count}, threshold={threshold})", calib=[ids])
    trials = [(int(t["into"].rpartition(".")[2]), tuple(int(m.rpartition(".")[2]) for m in t["merged"]),
               t["accepted"]) for t in cm.report.rules[0].details["trials"]]
    assert trials == _laco_by_hand(lm.model, ids, count, 4, threshold)


def test_auto_search_rejects_below_the_threshold_and_says_where_it_stopped(lm6):
    lm = lm6
    cm = slimfx.compile(lm, "collapse blocks auto(count=2, span=2, threshold=1.0)", calib=[lm.example_inputs])
    rule = cm.report.rules[0]
    assert rule.details["trials"] and not any(t["accepted"] for t in rule.details["trials"])
    assert len(cm.graph.blocks) == 6 and "stopped at 0 of 2" in " ".join(rule.notes)
    assert rule.notes[0] == "0 of 6 blocks removed"  # it said "0 of 6 blocks removed: " (an empty list)
    # Each rejected trial is undone: the next one merges on the original weights, and what is
    # compiled is the original model.
    for t in rule.details["trials"]:
        keep, merged = (int(p.rpartition(".")[2]) for p in (t["into"], *t["merged"]))
        assert abs(t["similarity"] - _similarity_by_hand(lm.model, keep, [merged], lm.example_inputs)) < 1e-5, t
    assert max_diff(outputs(cm, lm.example_inputs), outputs(lm.model, lm.example_inputs)) == 0


def test_keep_protected_blocks_are_never_merged(lm6):
    lm = lm6
    cm = slimfx.compile(lm, "keep blocks[3]\ncollapse blocks auto(count=1, span=2, threshold=0.01)",
                        calib=[lm.example_inputs])
    tried = {p for t in cm.report.rules[1].details["trials"] for p in (t["into"], *t["merged"])}
    assert "model.layers.3" not in tried and len(cm.graph.blocks) == 5


def test_auto_search_on_fewer_blocks_than_its_span_starts_at_the_first_block():
    """span=4 (the default) on 2 blocks ran no trial and blamed the threshold."""
    lm = _lm(2, 3)
    cm = slimfx.compile(lm, "collapse blocks auto(count=1, threshold=0.01)", calib=[lm.example_inputs])
    (trial,) = cm.report.rules[0].details["trials"]
    assert (trial["into"], trial["merged"]) == ("model.layers.0", ("model.layers.1",))
    assert abs(trial["similarity"] - _similarity_by_hand(lm.model, 0, [1], lm.example_inputs)) < 1e-5
    assert len(cm.graph.blocks) == 1


def test_a_search_that_can_try_nothing_says_why(lm6):
    lm = lm6
    cm = slimfx.compile(lm, "keep blocks[2]\ncollapse blocks[1:4] auto(count=1, span=2)", calib=[lm.example_inputs])
    notes = " ".join(cm.report.rules[1].notes)
    assert "no LaCo trial could run" in notes and len(cm.graph.blocks) == 6


def test_plan_and_compile_refuse_a_collapse_of_several_ranges_alike():
    """`plan` said "ready; 2 of 6 blocks removed" for what compile refuses: one check serves both."""
    lm = tiny("llama", layers=6)
    with pytest.raises(slimfx.SpecError) as planned:
        slimfx.plan(lm, "collapse blocks[::2]")
    with pytest.raises(slimfx.SpecError) as compiled:
        slimfx.compile(lm, "collapse blocks[::2]")
    for err in (planned.value, compiled.value):
        assert [d.kind for d in err.diagnostics] == ["selector"]
        assert "one contiguous range of blocks, and the selector gives 3 ranges" in err.diagnostics[0].message


@pytest.mark.parametrize("first, why", [("adapt blocks.*.attn.{q,v} lora rank=4", "an adapter from an earlier compile"),
                                        ("quantize blocks.*.** : Linear int8", "an earlier compile quantized it"),
                                        ("quantize blocks.*.attn.q fp16", "an earlier compile quantized it")])
def test_a_collapse_over_an_earlier_compiles_adapters_or_quantized_weights_is_refused(first, why):
    """In one policy that order is refused; over a CompiledModel compiled again it was merged
    silently: each adapter's A and B summed on their own (block 0 took block 1's adapter), a
    quantized linear's scales summed beside its codes (0.69 off the float collapse)."""
    earlier = slimfx.compile(tiny("llama", layers=3), first)
    for run in (slimfx.plan, slimfx.compile):
        with pytest.raises(slimfx.SpecError) as e:
            run(earlier, "collapse blocks[0:2]")
        assert e.value.kind == "illegal-order" and why in e.value.message
    assert slimfx.compile(earlier, "drop blocks[1]").report.rules[0].targets == ("model.layers.1",)


@pytest.mark.parametrize("first", ["quantize blocks[1].mlp.down int8", "adapt blocks[1].attn.q lora rank=2"])
def test_a_collapse_over_one_block_an_earlier_compile_changed_names_that_first(first):
    """The blocks then differ too, and "not built alike … a first block that differs" came first."""
    earlier = slimfx.compile(tiny("llama", layers=3), first)
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.plan(earlier, "collapse blocks[0:2]")
    assert e.value.kind == "illegal-order" and "model.layers.1." in e.value.message


def test_a_collapse_on_a_peft_model_says_to_merge_its_adapters():
    peft = pytest.importorskip("peft")
    lm = tiny("llama", layers=3)
    model = peft.get_peft_model(lm.model, peft.LoraConfig(r=4, target_modules=["q_proj"])).eval()
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.plan(model, "collapse blocks[0:2]", example_inputs=lm.example_inputs)
    assert "is a PEFT adapter layer" in e.value.message and "merge_and_unload()" in e.value.hint


def test_a_collapse_into_a_block_whose_weight_another_block_shares_is_refused():
    """Blocks 1 and 3 share a down projection: `collapse blocks[1:3]` put the merged weight in
    every slot holding it, block 3's too, silently (0.08 off the merge with block 3 untouched);
    plan and compile now refuse it naming both, and the auto search never tries a merge into 1."""
    lm = _lm(5, 4)
    model = tie_down_projections(lm.model, 1, 3)
    for run in (lambda p: slimfx.plan(model, p, example_inputs=lm.example_inputs),
                lambda p: slimfx.compile(model, p, example_inputs=lm.example_inputs, calib=[lm.example_inputs])):
        with pytest.raises(slimfx.SpecError) as e:
            run("collapse blocks[1:3]")
        assert e.value.kind == "unsupported" and "tied" in e.value.message
        assert {"model.layers.1.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"} <= \
            set(e.value.message.replace(",", " ").split())
    cm = slimfx.compile(model, "collapse blocks[0:3] auto(count=1, span=2, threshold=0.01)",
                        example_inputs=lm.example_inputs, calib=[lm.example_inputs])
    assert [t["into"] for t in cm.report.rules[0].details["trials"]] == ["model.layers.0"]


@pytest.mark.parametrize("policy", ["drop blocks[1]", "collapse blocks[1:3]"])
def test_an_explicit_removal_with_no_heal_after_it_reads_no_calibration(lm6, policy, monkeypatch):
    """What the removed blocks output is recorded for a heal: without one it was a forward over
    all the calibration text for nothing, and the report said the model was calibrated on it."""
    from slimfx.passes.collapse import apply

    seen, collect = [], apply.collect
    monkeypatch.setattr(apply, "collect", lambda *a, **k: seen.append(a) or collect(*a, **k))
    cm = slimfx.compile(lm6, policy)
    assert cm.report.calibration == "" and not seen
    healed = slimfx.compile(lm6, policy + "\nheal method=linear")
    assert healed.report.calibration.endswith("rows") and seen


def test_an_auto_collapse_may_merge_into_a_block_that_begins_with_an_earlier_heals_map():
    """Such a block may not be removed (its map would go with it), but it may be kept and merged
    into, as an explicit collapse does: the search left it out of every trial and blamed `keep`."""
    lm = _lm(6, 3)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 250, (4, 32), generator=g),
              "attention_mask": torch.ones(4, 32, dtype=torch.long)} for _ in range(3)]
    healed = slimfx.compile(lm, "drop blocks[2]\nheal method=linear", calib=calib)  # layers.3 begins with the map
    explicit = slimfx.compile(healed, "collapse blocks[2:5]", calib=calib)
    assert explicit.report.rules[0].details["into"] == "model.layers.3"
    auto = slimfx.compile(healed, "collapse blocks auto(count=2, threshold=0.1)", calib=calib).report.rules[0]
    assert auto.details["trials"] and any(t["into"] == "model.layers.3" for t in auto.details["trials"])
    assert all("model.layers.3" not in t["merged"] for t in auto.details["trials"])  # never removed
