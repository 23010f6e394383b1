"""`heal` (passes/collapse/heal.py): the linear map and its folded variant against the same fit
applied by hand to the Hugging Face model (hooks and a weight edit); LoRA healing trains, merges
or stays; bad input."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx import SpecError
from slimfx.models import tiny
from slimfx.passes.collapse.fit import fit_map

from collapse_ref import eager_tiny, layer_streams, layers_of, mapped_at, tie_down_projections, without_layers
from output_compare import max_diff, outputs


_SHARED = {}


def _shared():
    """One tiny Llama for the tests that leave it unchanged: captured once (capture cache)."""
    if "lm" not in _SHARED:
        _SHARED["lm"] = eager_tiny(seed=22)
    return _SHARED["lm"]


def test_linear_heal_is_the_fit_applied_at_the_cut():
    lm = _shared()
    ids = lm.example_inputs
    original = layer_streams(lm.model, "model.layers", ids)
    dropped = without_layers(lm.model, "model.layers", {2, 3})
    x = layer_streams(dropped, "model.layers", ids)[2]  # what enters the gap (= layer 4's input now)
    fit = fit_map([x], [original[4]])
    reference = mapped_at(dropped, "model.layers", 2, fit.map)
    cm = slimfx.compile(lm, "drop blocks[2:4]\nheal method=linear", calib=[ids])
    assert max_diff(outputs(cm, ids), outputs(reference, ids)) < 1e-4
    cut = cm.report.rules[1].details["cuts"][0]
    assert cut["residual_after"] < cut["residual_before"]
    assert cm.report.rules[1].notes[0].startswith(f"a {fit.map.shape[0]}×{fit.map.shape[0]} map at the cut; ")
    assert hasattr(cm.program.get_submodule("model.layers"), "heal_map_4")


def test_a_map_fitted_on_few_tokens_says_more_text_helps():
    """The example's tokens are far fewer than 10× the map's width: the report says so and how to
    give more; the default calibration (3,061 byte tokens for a 64-wide map) is enough."""
    lm = _shared()
    ids = lm.example_inputs
    few = slimfx.compile(lm, "drop blocks[2:4]\nheal method=linear", calib=[ids]).report.rules[1]
    d = lm.model.config.hidden_size
    assert few.details["calib_tokens"] == ids["input_ids"].numel() < 10 * d
    assert any(n.startswith(f"fitted on {ids['input_ids'].numel()} calibration tokens, fewer than 10×") and
               "calib=25000" in n for n in few.notes)
    enough = slimfx.compile(lm, "drop blocks[2:4]\nheal method=linear").report.rules[1]
    assert enough.details["calib_tokens"] >= 10 * d
    assert not any(n.startswith("fitted on") for n in enough.notes)


def test_linear_heal_after_the_last_block_maps_into_the_final_norm(tmp_path):
    lm = _shared()
    ids = lm.example_inputs
    original = layer_streams(lm.model, "model.layers", ids)
    dropped = without_layers(lm.model, "model.layers", {3, 4})
    x = layer_streams(dropped, "model.layers", ids)[3]
    fit = fit_map([x], [original[5]])
    reference = mapped_at(dropped, "model.layers", None, fit.map, final_norm="model.norm")
    cm = slimfx.compile(lm, "drop blocks[3:5]\nheal method=linear", calib=[ids])
    assert max_diff(outputs(cm, ids), outputs(reference, ids)) < 1e-4
    cm.save(tmp_path / "healed")
    back = slimfx.load(tmp_path / "healed", backend="eager")
    for a, b in zip(outputs(cm, ids), outputs(back, ids)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rules", ["drop {blocks[1], blocks[4]}", "drop blocks[4]\ndrop blocks[1]"])
def test_cuts_made_by_several_rules_are_healed_in_model_order(rules):
    """The map at the later cut is fitted on the stream with the earlier cut's map applied, however
    the rules made them: `drop blocks[4]` then `drop blocks[1]` fitted block 4's cut first, on a
    stream without block 1's map, which then ran in front of it (0.35 off the one-rule heal)."""
    lm = eager_tiny(layers=6, seed=26)
    ids = lm.example_inputs
    original = layer_streams(lm.model, "model.layers", ids)
    dropped = without_layers(lm.model, "model.layers", {1, 4})  # layers 0, 2, 3, 5
    first = fit_map([layer_streams(dropped, "model.layers", ids)[1]], [original[2]])
    mapped = mapped_at(dropped, "model.layers", 1, first.map)
    second = fit_map([layer_streams(mapped, "model.layers", ids)[3]], [original[5]])
    reference = mapped_at(mapped, "model.layers", 3, second.map)
    cm = slimfx.compile(lm, rules + "\nheal method=linear", calib=[ids])
    assert [c["removed"] for c in cm.report.rules[-1].details["cuts"]] == [["model.layers.1"], ["model.layers.4"]]
    assert max_diff(outputs(cm, ids), outputs(reference, ids)) < 1e-4


@pytest.mark.parametrize("rules, cuts", [
    ("drop blocks[2]", 1),
    ("drop {blocks[1], blocks[4]}", 2),
    ("drop blocks[4]\ndrop blocks[1]", 2),
    ("drop blocks[2]\ndrop blocks[1:3]", 1),  # blocks 1 and 3 of the model sit on both sides of the first gap
])
def test_plan_counts_the_maps_a_linear_heal_adds_as_compile_does(rules, cuts):
    """`slimfx plan` showed "0" params and "0 B" for `heal method=linear`, which adds a d×d map
    at each cut: it now counts the cuts the rules before it leave, as compile's report measures."""
    lm = eager_tiny(layers=6, seed=26)
    policy = rules + "\nheal method=linear"
    heal = slimfx.plan(lm, policy).rules[-1].estimate
    report = slimfx.compile(lm, policy, calib=[lm.example_inputs]).report.rules[-1]
    assert len(report.details["cuts"]) == cuts
    assert (heal.params_before, heal.params_after) == (0, report.params_after - report.params_before)
    assert (heal.bytes_before, heal.bytes_after) == (0, report.bytes_after - report.bytes_before)
    assert heal.params_after == cuts * 64 * 64


def test_plan_after_an_auto_drop_gives_a_linear_heal_per_cut():
    heal = slimfx.plan(eager_tiny(layers=6, seed=26), "drop blocks auto(count=2)\nheal method=linear").rules[-1]
    assert (heal.estimate.params_before, heal.estimate.params_after) == (0, 0)
    assert "(+4,096 params per cut)" in heal.estimate.note and heal.deferred_by == 1


def test_folded_heal_edits_the_down_projection_before_the_cut():
    lm = _shared()
    ids = lm.example_inputs
    original = layer_streams(lm.model, "model.layers", ids)
    dropped = without_layers(lm.model, "model.layers", {2, 3})
    down = dropped.model.layers[1].mlp.down_proj
    seen = []
    handle = down.register_forward_hook(lambda m, a, out: seen.append(out))
    h = layer_streams(dropped, "model.layers", ids)[2]
    handle.remove()
    keep = ids["attention_mask"].reshape(-1) != 0
    m = seen[0].reshape(-1, seen[0].shape[-1])[keep]
    fit = fit_map([m], [original[4] - (h - m)])
    with torch.no_grad():
        down.weight.copy_(fit.map.T @ down.weight)
    cm = slimfx.compile(lm, "drop blocks[2:4]\nheal method=linear fold=true", calib=[ids])
    assert max_diff(outputs(cm, ids), outputs(dropped, ids)) < 1e-4
    assert not any("heal_map" in n for n, _ in cm.program.named_buffers())


@pytest.mark.parametrize("arch, container, down", [("gpt2", "transformer.h", "mlp.c_proj"),
                                                    ("opt", "model.decoder.layers", "fc2")])
def test_folded_heal_on_conv1d_and_viewed_block_outputs(arch, container, down):
    """GPT-2's Conv1D output is [B·S, D] rows viewed back, OPT's block output its residual sum
    viewed: both pre-norm, both were refused as 'not a residual sum'. Checked against the fit
    folded by hand into the weight and bias (Conv1D: W ← W·T)."""
    lm = tiny(arch, layers=4, seed=5, attn_implementation="eager")
    ids = lm.example_inputs
    with torch.no_grad():  # random init leaves them 0, where a fold that forgot the bias looks right
        for layer in layers_of(lm.model, container):
            layer.get_submodule(down).bias.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    original = layer_streams(lm.model, container, ids)
    dropped = without_layers(lm.model, container, {2})
    proj = layers_of(dropped, container)[1].get_submodule(down)
    seen = []
    handle = proj.register_forward_hook(lambda m, a, out: seen.append(out))
    h = layer_streams(dropped, container, ids)[2]
    handle.remove()
    keep = ids["attention_mask"].reshape(-1) != 0
    m = seen[0].reshape(-1, seen[0].shape[-1])[keep]
    t = fit_map([m], [original[3] - (h - m)]).map
    with torch.no_grad():
        proj.weight.copy_(proj.weight @ t if arch == "gpt2" else t.T @ proj.weight)
        proj.bias.copy_(proj.bias @ t)
    cm = slimfx.compile(lm, "drop blocks[2]\nheal method=linear fold=true", calib=[ids])
    assert max_diff(outputs(cm, ids), outputs(dropped, ids)) < 1e-4


@pytest.mark.parametrize("first, says", [("quantize blocks.*.** : Linear int4", "stored that weight quantized"),
                                         ("adapt blocks.*.mlp.down lora", "an adapter sits on it"),
                                         ("heal method=linear", "already put a map at this cut")])
def test_fold_where_an_earlier_rule_took_the_float_weight_or_the_cut_is_refused_at_its_line(first, says):
    """A quantized down projection was a raw PassError ('has no `weight` parameter'); an adapter on
    it or a map at the cut were blamed on the block's form ('not a pre-norm block')."""
    lm = _shared()
    with pytest.raises(SpecError) as e:
        slimfx.compile(lm, f"drop blocks[2]\n{first}\nheal method=linear fold=true", calib=[lm.example_inputs])
    assert e.value.kind == "illegal-order" and e.value.line == 3 and says in str(e.value)
    assert "put this heal above that rule, or write fold=false" in str(e.value)


@pytest.mark.parametrize("keep_first", [True, False])
def test_lora_heal_leaves_what_keep_protects_unchanged(keep_first):
    """Its adapters were merged into a kept block's linears, whatever `keep` said (above or below
    the drop): the report said 9 targets protected, and all 7 weights changed."""
    lm = eager_tiny(layers=4, seed=23)
    rules = ["keep blocks[0]", "drop blocks[1]"] if keep_first else ["drop blocks[1]", "keep blocks[0]"]
    cm = slimfx.compile(lm, "\n".join(rules) + "\nheal method=lora steps=2 lr=0.01", calib=[lm.example_inputs])
    original = lm.model.state_dict()
    state = cm.program.state_dict()
    kept = [k for k in state if k.startswith("model.layers.0.")]
    assert kept and all(torch.equal(state[k], original[k]) for k in kept)
    healed = [k for k in state if k.startswith("model.layers.2.") and k.endswith("proj.weight")]  # after the cut
    assert len(healed) == 7 and not any(torch.equal(state[k], original[k]) for k in healed)
    assert "7 linears near the cuts protected by `keep`, left without adapters" in cm.report.rules[2].notes


def test_a_heal_with_every_linear_near_the_cuts_kept_or_a_kept_fold_target_is_refused():
    lm = _shared()
    for rules, says in (("keep {blocks[1], blocks[4]}\ndrop blocks[2:4]\nheal method=lora steps=1",
                         "`keep` protects 14 of them"),
                        ("keep blocks[1].mlp.down\ndrop blocks[2:4]\nheal method=linear fold=true",
                         "model.layers.1.mlp.down_proj's weight, and a `keep` rule protects it")):
        with pytest.raises(SpecError) as e:
            slimfx.compile(lm, rules, calib=[lm.example_inputs])
        assert e.value.line == 3 and says in str(e.value)


def test_fold_is_refused_where_the_block_output_is_not_a_residual_sum():
    lm = tiny("bert", layers=4, seed=25, attn_implementation="eager")
    with pytest.raises(SpecError) as e:
        slimfx.compile(lm, "drop blocks[2]\nheal method=linear fold=true", calib=[lm.example_inputs])
    assert e.value.diagnostics[0].kind == "unsupported" and "fold=false" in str(e.value)


def test_lora_heal_trains_and_merges():
    lm = _shared()
    ids = lm.example_inputs
    cm = slimfx.compile(lm, "drop blocks[2]\nheal method=lora steps=12 lr=0.01 rank=4", calib=[ids])
    d = cm.report.rules[1].details
    assert d["last_loss"] < d["first_loss"] and d["merged"] and d["adapters"] == 14  # 7 linears × 2 blocks
    assert cm.adapter_parameters() == []
    # Training starts from the cut model (each adapter's B at 0): its first loss is the next-token
    # cross entropy of the model without block 2, computed here on the Hugging Face modules.
    with torch.no_grad():
        logits = without_layers(lm.model, "model.layers", {2})(**ids).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids["input_ids"][:, 1:].flatten())
    assert abs(d["first_loss"] - float(by_hand)) < 1e-5


def test_lora_heal_kept_unmerged_is_trainable_and_distills_from_the_original():
    lm = _shared()
    cm = slimfx.compile(lm, "drop blocks[2]\nheal method=linear\nheal method=lora steps=3 distill=true merge=false",
                        calib=[lm.example_inputs])
    assert cm.report.rules[2].details["loss"] == "distill"
    params = cm.adapter_parameters()
    assert params and all(p.requires_grad for p in params)
    assert {p.rsplit(".", 2)[0] for p in cm.adapters} <= {f"model.layers.{i}" for i in (1, 3)}


_UNMERGED_HEAL = "drop blocks[2]\nheal method=lora steps=1 merge=false\n"  # adapters kept on blocks 1 and 3


def _after_unmerged_heal(rule: str):
    lm = _shared()
    return slimfx.compile(lm, _UNMERGED_HEAL + rule, calib=[lm.example_inputs])


def _refused_after_unmerged_heal(rule: str):
    """The SpecError's one diagnostic: `unsupported`, at the rule's line (3)."""
    with pytest.raises(SpecError) as e:
        _after_unmerged_heal(rule)
    (d,) = e.value.diagnostics
    assert d.kind == "unsupported" and d.line == 3
    return d


def test_an_adapt_rule_after_an_unmerged_heal_keeps_off_its_adapters():
    """The heal's kept adapters sit on the linears of blocks 1 and 3 (blocks[1] and blocks[2] once
    block 2 is gone): an `adapt` of one of those is refused at its line, not a raw PassError; an
    `adapt` elsewhere adds its own. The blocks stay indexed with adapters on only some of them."""
    d = _refused_after_unmerged_heal("adapt blocks[1].attn.v lora rank=2")
    assert "model.layers.1.self_attn.v_proj already carries" in d.message
    cm = _after_unmerged_heal("adapt blocks[0].attn.v lora rank=2")
    assert "model.layers.0.self_attn.v_proj" in cm.adapters
    assert [b.path for b in cm.graph.blocks] == [f"model.layers.{i}" for i in (0, 1, 3, 4)]


def test_a_second_lora_heal_where_an_unmerged_one_left_no_free_linear_is_refused_at_its_line():
    assert "merge=false" in _refused_after_unmerged_heal("heal method=lora steps=1").message
    cm = _after_unmerged_heal("heal method=lora steps=1 reach=2")
    assert cm.report.rules[2].details["adapters"] == 14  # the 7 linears of blocks 0 and 4: 1 and 3 had theirs


@pytest.mark.parametrize("drop, reach, near", [
    ("blocks[3]", " reach=2", {1, 2, 4, 5}),
    ("blocks[3]", " reach=9", {0, 1, 2, 4, 5, 6}),  # more than there are: every remaining block
    ("{blocks[1], blocks[5]}", " reach=2", {0, 2, 3, 4, 6}),  # 3 and 4 are within 2 of both cuts
    ("{blocks[2], blocks[5]}", "", {1, 3, 4, 6}),  # the default, reach=1
])
def test_lora_heal_reach_puts_adapters_on_the_blocks_near_each_cut(drop, reach, near):
    lm = eager_tiny(layers=7, seed=23)
    cm = slimfx.compile(lm, f"drop {drop}\nheal method=lora steps=1 merge=false{reach}", calib=[lm.example_inputs])
    assert {int(p.split(".")[2]) for p in cm.adapters} == near  # paths keep the original block numbers
    d, note = cm.report.rules[1].details, cm.report.rules[1].notes[0]
    assert d["adapters"] == 7 * len(near) and d["blocks"] == [f"model.layers.{i}" for i in sorted(near)]
    assert (f"of {len(near)} blocks within {reach[7:]} of the cuts" if reach else "beside the cuts") in note


@pytest.mark.parametrize("drop, reach", [("blocks[3]", 1), ("{blocks[1], blocks[5]}", 2), ("blocks[0]", 1),
                                         ("blocks[6]", 2)])
def test_plan_counts_the_adapters_an_unmerged_lora_heal_keeps_as_compile_does(drop, reach):
    """`plan` showed 0 params and 0 B for `heal method=lora merge=false`, which keeps r·(in+out)
    float32 parameters on every linear near the cuts."""
    lm = eager_tiny(layers=7, seed=23)
    policy = f"drop {drop}\nheal method=lora steps=1 merge=false reach={reach}"
    heal = slimfx.plan(lm, policy).rules[-1].estimate
    report = slimfx.compile(lm, policy, calib=[lm.example_inputs]).report.rules[-1]
    assert heal.params_after > 0
    assert (heal.params_before, heal.params_after) == (0, report.params_after - report.params_before)
    assert (heal.bytes_before, heal.bytes_after) == (0, report.bytes_after - report.bytes_before)
    assert f"on {report.details['adapters']} linears" in heal.note
    merged = slimfx.plan(lm, policy.replace("merge=false", "merge=true")).rules[-1].estimate
    assert (merged.params_before, merged.params_after) == (0, 0)


def test_plan_leaves_out_the_linears_an_earlier_adapter_holds_as_the_lora_heal_does():
    """The heal puts no adapter where one is: plan counted 14 linears, compile adapted 12."""
    lm = eager_tiny(layers=4, seed=23)
    policy = "drop blocks[1]\nadapt blocks.*.attn.q lora rank=4 merge=false\nheal method=lora steps=1 merge=false"
    heal = slimfx.plan(lm, policy).rules[-1].estimate
    report = slimfx.compile(lm, policy, calib=[lm.example_inputs]).report.rules[-1]
    assert report.details["adapters"] == 12 and "on 12 linears" in heal.note
    assert heal.params_after == report.params_after - report.params_before


def test_lora_heal_schedule_reaches_the_training():
    """One step is the same under both schedules (its factor is 1); four are not (the cosine
    decays the last two), and the report says which schedule ran."""
    lm = eager_tiny(layers=4, seed=24)
    calib = [lm.example_inputs]

    def healed(steps, schedule):
        cm = slimfx.compile(lm, f"drop blocks[1]\nheal method=lora steps={steps} lr=0.01 merge=false{schedule}",
                            calib=calib)
        return cm, {n: p.detach() for n, p in cm.named_parameters() if "lora_B" in n}

    for steps, same in ((1, True), (4, False)):
        (c, cos), (_, const) = healed(steps, " schedule=cosine"), healed(steps, "")
        assert all(torch.equal(cos[n], const[n]) for n in cos) is same
    assert c.report.rules[1].details["schedule"] == "cosine"
    assert "4 steps (cosine lr) of lm loss" in c.report.rules[1].notes[0]


def test_heal_offers_the_schedules_train_knows():
    from slimfx.dsl.schema import SCHEMAS
    from slimfx.runtime.train import SCHEDULES

    spec = SCHEMAS["heal"]["schedule"]
    assert spec.choices == SCHEDULES and spec.default == "constant"


def test_a_lora_heal_that_diverges_is_an_error_at_its_line():
    """train()'s FloatingPointError came out of compile() raw."""
    lm = _shared()
    with pytest.raises(SpecError, match=r"(?s)`heal method=lora` training diverged: .*lower lr.*this one is 1e\+30") as e:
        slimfx.compile(lm, "drop blocks[2]\nheal method=lora steps=3 lr=1e30 rank=4", calib=[lm.example_inputs])
    assert e.value.line == 2


def test_heal_first_is_an_illegal_order():
    with pytest.raises(SpecError) as e:
        slimfx.compile(_shared(), "heal method=linear\ndrop blocks[1]")
    assert e.value.diagnostics[0].kind == "illegal-order"


def test_heal_needs_calibration():
    model, inputs = _shared().model, _shared().example_inputs
    with pytest.raises(SpecError) as e:
        slimfx.compile(model, "drop blocks[1]\nheal method=linear", example_inputs=inputs)
    assert "calib" in str(e.value)


def test_lora_heal_over_quantized_blocks_must_stay_unmerged():
    rules = "drop blocks[2]\nquantize blocks.*.** : Linear int8\nheal method=lora steps=1"
    with pytest.raises(SpecError) as e:
        slimfx.compile(_shared(), rules)
    assert e.value.diagnostics[0].kind == "illegal-order" and "merge=false" in str(e.value)
    cm = slimfx.compile(_shared(), rules + " merge=false")
    assert cm.adapter_parameters()


@pytest.mark.parametrize("fold", ["false", "true"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_linear_heal_on_a_half_model_stays_in_its_dtype(dtype, fold):
    """The map (fitted in float64) is stored in the stream's dtype, or folded in float32 and rounded
    back into the half down projection; a float32 map beside half activations made every forward
    fail. The healed half model is as close to the healed float32 model as the unhealed half model
    is to float32 (measured 1.0–1.1×), and far closer than what the heal changes (≈0.43)."""
    full = eager_tiny(seed=22)
    ids = full.example_inputs
    policy = f"drop blocks[2:4]\nheal method=linear fold={fold}"
    healed_full = outputs(slimfx.compile(full, policy, calib=[ids]), ids)
    half = eager_tiny(seed=22)
    half.model.to(dtype)
    cm = slimfx.compile(half, policy, calib=[ids])
    got = outputs(cm, ids)
    assert got[0].dtype == dtype and all(torch.isfinite(g).all() for g in got)
    noise = max_diff(outputs(half.model, ids), outputs(full.model, ids))
    assert max_diff(got, healed_full) < 3 * noise
    assert {b.dtype for _, b in cm.program.named_buffers()} <= {dtype}
    maps = [p for p in cm.graph.modules["model.layers"].params if "heal_map" in p.name]
    if fold == "false":
        (info,) = maps
        assert info.dtype == str(dtype).removeprefix("torch.") and info.nbytes == 64 * 64 * dtype.itemsize
    else:
        assert not maps and {p.dtype for p in cm.program.parameters()} == {dtype}


def test_lora_heal_on_a_bf16_model_merges_into_its_half_weights():
    """`heal method=lora` merges by default; on a bf16 model (no quantize rule) the merge was
    refused as if the weights were quantized. Merged, it computes what the unmerged heal does, to
    bf16 rounding, with every weight still bf16."""
    lm = eager_tiny(seed=22)
    lm.model.to(torch.bfloat16)
    ids = lm.example_inputs
    rules = "drop blocks[2]\nheal method=lora steps=4 lr=0.01 rank=4"
    merged = slimfx.compile(lm, rules, calib=[ids])
    kept = slimfx.compile(lm, rules + " merge=false", calib=[ids])
    assert merged.report.rules[1].details["merged"] and merged.adapter_parameters() == []
    assert {p.dtype for p in merged.program.parameters()} == {torch.bfloat16}
    got, want = outputs(merged, ids), outputs(kept, ids)
    assert got[0].dtype == torch.bfloat16 and torch.isfinite(got[0]).all()
    assert max_diff(got, want) < 3e-2
    assert max_diff(want, outputs(slimfx.compile(lm, "drop blocks[2]", calib=[ids]), ids)) > 0.05, \
        "the heal must have moved the outputs"


def test_a_fold_into_a_down_projection_another_block_shares_is_refused():
    """Blocks 1 and 3 share a down projection: `drop blocks[2]` then a folded heal folded T into
    block 3's weight too, silently; now a SpecError at the heal says so."""
    lm = eager_tiny(layers=5, seed=4)
    model = tie_down_projections(lm.model, 1, 3)
    with pytest.raises(SpecError) as e:
        slimfx.compile(model, "drop blocks[2]\nheal method=linear fold=true", example_inputs=lm.example_inputs,
                       calib=[lm.example_inputs])
    assert e.value.kind == "unsupported" and e.value.line == 2
    assert "model.layers.1.mlp.down_proj" in e.value.message and "tied" in e.value.message
