"""The `adapt` pass (passes/adapters/adapt.py): PEFT's initialisation, merge=true, the report, and
every bad input as a SpecError at the rule."""
from __future__ import annotations

import math

import pytest
import torch

import slimfx
from slimfx import SpecError
from slimfx.models import tiny

from passes_tiny import Wide


def _compile_wide(rules: str):
    return slimfx.compile(Wide(), "policy p {\n" + rules + "\n}", example_inputs={"x": torch.randn(2, 256)})


def test_kaiming_init_is_peft_default():
    """PEFT's init_lora_weights=True: A ~ kaiming_uniform(a=√5), i.e. U(±1/√in); B = 0."""
    proj = _compile_wide("adapt proj lora rank=16").program.get_submodule("proj")
    bound = 1 / math.sqrt(256)
    assert proj.lora_A.shape == (16, 256) and proj.lora_B.shape == (64, 16)
    assert proj.lora_A.abs().max() <= bound and proj.lora_A.abs().max() > 0.95 * bound
    assert abs(proj.lora_A.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.count_nonzero(proj.lora_B) == 0


def test_gaussian_init_is_peft_gaussian():
    """PEFT's init_lora_weights="gaussian": A ~ N(0, 1/r)."""
    proj = _compile_wide("adapt proj lora rank=16 init=gaussian").program.get_submodule("proj")
    assert abs(proj.lora_A.std().item() - 1 / 16) < 0.005
    assert abs(proj.lora_A.mean().item()) < 0.005


def test_dora_magnitude_starts_at_the_weight_row_norms():
    model = Wide()
    proj = slimfx.compile(model, "policy p {\nadapt proj dora rank=4\n}",
                          example_inputs={"x": torch.randn(2, 256)}).program.get_submodule("proj")
    torch.testing.assert_close(proj.lora_magnitude, model.proj.weight.detach().norm(dim=1))


def test_merge_true_leaves_no_adapter_and_says_a_fresh_one_is_zero():
    lm = tiny("llama")
    cm = slimfx.compile(lm, "policy p {\nadapt blocks.*.attn.{q,v} lora rank=4 merge=true\n}")
    assert cm.adapters == {} and cm.adapter_parameters() == []
    rule = cm.report.rules[0]
    assert rule.details["merged"] is True and rule.details["trainable_params"] == 0
    assert any("fresh adapters are zero" in n for n in rule.notes)
    with torch.no_grad():
        assert torch.equal(cm(**lm.example_inputs).logits, lm.model(**lm.example_inputs).logits)


def test_report_counts_trainable_parameters_and_bytes():
    lm = tiny("llama")  # hidden 64; q: 64→64, v: 64→32 per block, 2 blocks
    cm = slimfx.compile(lm, "policy p {\nquantize blocks.*.attn.* : Linear int4 group=16\n"
                            "adapt blocks.*.attn.{q,v} lora rank=4 alpha=8\n}")
    rule = cm.report.rules[1]
    added = sum(p.numel() for p in cm.adapter_parameters())
    q = lm.model.model.layers[0].self_attn.q_proj
    v = lm.model.model.layers[0].self_attn.v_proj
    assert added == 2 * 4 * (q.in_features + q.out_features + v.in_features + v.out_features)
    assert rule.details["trainable_params"] == added and rule.details["adapters"] == 4
    assert rule.details["rank"] == 4 and rule.details["alpha"] == 8.0
    assert rule.params_after - rule.params_before == added
    assert rule.bytes_after - rule.bytes_before == 4 * added
    assert 0 < rule.bytes_before < 2 * q.weight.numel(), "the base is counted as stored: packed int4"
    assert f"{added:,} trainable parameters" in rule.notes[0]


def _error(lm, rules: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        slimfx.compile(lm, "policy p {\n" + rules + "\n}")
    return info.value


def test_rank_above_the_smaller_dimension_is_refused():
    e = _error(tiny("llama"), "adapt blocks.*.attn.k lora rank=33")
    assert e.diagnostics[0].kind == "out-of-range" and e.diagnostics[0].line == 2
    assert e.diagnostics[0].column == 28 and e.diagnostics[0].width == len("rank=33")  # at `rank=`, not the rule
    assert "rank=33 is larger than model.layers.0.self_attn.k_proj's smaller dimension (32)" in str(e)
    assert "use rank=32 or less" in str(e)


def test_adapter_on_something_that_is_not_a_linear_is_refused():
    e = _error(tiny("llama"), "adapt embed lora")
    assert e.diagnostics[0].kind == "selector" and "acts on linear layers" in str(e)


def test_merge_into_quantized_weights_is_refused_at_the_rule():
    e = _error(tiny("llama"), "quantize blocks.*.attn.q int8\nadapt blocks.*.attn.q lora merge=true")
    assert e.diagnostics[0].kind == "illegal-order" and e.diagnostics[0].line == 3
    assert "merge=false" in str(e)


def test_merge_into_a_tied_weight_is_refused_at_the_rule():
    lm = tiny("llama")
    lm.model.lm_head.weight = lm.model.model.embed_tokens.weight
    e = _error(lm, "adapt head lora rank=2 merge=true")
    assert e.diagnostics[0].kind == "illegal-order" and "tied to model.embed_tokens.weight" in str(e)


def test_two_adapters_on_one_linear_are_refused():
    e = _error(tiny("llama"), "adapt blocks.*.attn.q lora\nadapt blocks.*.attn.* dora")
    assert e.diagnostics[0].kind == "duplicate" and e.diagnostics[0].line == 3
    assert "already has an adapter from line 2" in str(e)


def test_adapting_a_linear_whose_compiled_model_came_with_an_adapter_says_so():
    """The message blamed an earlier rule (a `heal … merge=false`) that did not exist."""
    lm = tiny("llama")
    cm = slimfx.compile(lm, "adapt blocks.*.attn.{q,v} lora rank=4 alpha=8")
    with pytest.raises(slimfx.SpecError) as e:
        slimfx.compile(cm, "adapt blocks.*.attn.q lora rank=2")
    assert "already carries an adapter: the CompiledModel this policy compiles came with it" in str(e.value)
    assert "cm.merge_adapters()" in e.value.hint and "heal" not in str(e.value)
    assert slimfx.compile(cm, "adapt blocks.*.attn.k lora rank=2").adapters.keys() >= {  # other linears are free
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"}


def test_fresh_adapters_are_the_same_each_compile_and_leave_the_callers_rng_alone():
    """lora_A came from the global RNG: two compiles of one policy differed, and each advanced the
    caller's torch.manual_seed stream."""
    model, x = Wide(), {"x": torch.randn(2, 256)}

    def lora_a(rules):
        return slimfx.compile(model, rules, example_inputs=x).program.get_submodule("proj").lora_A.detach()
    for rules in ("adapt proj lora rank=4", "adapt proj lora rank=4 init=gaussian"):
        state = torch.get_rng_state()
        first = lora_a(rules)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(first, lora_a(rules))
