"""Folding adapters into their weights (runtime/adapter_merge.py): merged == unmerged, the folded
weight equals the papers' formula, refusals come before any change, the original is untouched."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.models import tiny
from slimfx.runtime.adapter_merge import MergeError
from slimfx.runtime.adapters import tag_of


def _compile(lm, rules: str):
    return slimfx.compile(lm, "policy p {\n" + rules + "\n}")


def _trained(lm, rules: str, seed: int = 0):
    """Compiled with adapters whose weights are random (as if trained); the same every run (A's
    kaiming init draws from the global generator)."""
    torch.manual_seed(seed)
    cm = _compile(lm, rules)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return cm


def _out(cm, lm):
    with torch.no_grad():
        r = cm(**lm.example_inputs)
    return r.logits if hasattr(r, "logits") else r[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_equals_unmerged(arch, method):
    lm = tiny(arch)
    cm = _trained(lm, f"adapt blocks.*.** : Linear {method} rank=4 alpha=8")
    merged = cm.merge_adapters()
    torch.testing.assert_close(_out(merged, lm), _out(cm, lm), rtol=1e-5, atol=1e-5)
    assert merged.adapters == {} and merged.adapter_parameters() == []
    assert not any(tag_of(n) for n in merged.program.graph.nodes)
    assert cm.adapters and len(cm.adapter_parameters()) > 0, "the unmerged model is unchanged"
    assert not any(p.requires_grad for p in merged.parameters())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_folded_weight_is_the_papers_formula(method):
    lm = tiny("gpt2")  # Conv1D: the weight is stored [in, out]
    cm = _trained(lm, f"adapt blocks[0].attn.qkv {method} rank=2 alpha=5")
    path = "transformer.h.0.attn.c_attn"
    module = cm.program.get_submodule(path)
    w = module.weight.detach().T  # [out, in]
    delta = 2.5 * module.lora_B.detach() @ module.lora_A.detach()
    expected = w + delta
    if method == "dora":  # DoRA eq. 5: m · V / ‖V‖_c, per output unit
        expected = module.lora_magnitude.detach()[:, None] * expected / expected.norm(dim=1, keepdim=True)
    merged = cm.merge_adapters().program.get_submodule(path).weight
    torch.testing.assert_close(merged.T, expected, rtol=1e-6, atol=1e-6)


def test_merge_refused_over_a_quantized_base_says_what_to_do():
    lm = tiny("llama")
    cm = _trained(lm, "quantize blocks.*.attn.* : Linear int4 group=16\nadapt blocks.*.attn.q lora rank=2")
    before = [p.detach().clone() for p in cm.adapter_parameters()]
    with pytest.raises(MergeError, match=r"quantized.*train, call merge_adapters\(\), then quantize"):
        cm.merge_adapters()
    assert all(torch.equal(a, b) for a, b in zip(before, cm.adapter_parameters()))
    assert len(cm.adapters) == 2


def test_merge_refused_into_a_tied_weight():
    lm = tiny("llama")
    lm.model.config.tie_word_embeddings = True
    lm.model.lm_head.weight = lm.model.model.embed_tokens.weight
    cm = _trained(lm, "adapt head lora rank=2")
    with pytest.raises(MergeError, match="tied to model.embed_tokens.weight"):
        cm.merge_adapters()


def test_merge_then_quantize_by_a_second_compile():
    """The order the refusal recommends: train, merge, then compile the merged model again."""
    lm = tiny("llama")
    cm = _trained(lm, "adapt blocks.*.** : Linear lora rank=4 alpha=8")
    merged = cm.merge_adapters()
    quantized = slimfx.compile(merged, "quantize blocks.*.** : Linear int8")
    direct = _compile(tiny("llama"), "quantize blocks.*.** : Linear int8")
    err_merged = (_out(quantized, lm) - _out(merged, lm)).abs().max()
    assert 0 < err_merged < 0.05, "int8 of the merged weights: close to the merged model, not equal"
    assert not torch.equal(_out(quantized, lm), _out(direct, lm)), "the merged weights were the ones quantized"
    assert quantized.report.policy == "inline" and len(merged.adapters) == 0


# ---- a half-precision base ---------------------------------------------------------------------

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _half(dtype: str):
    lm = tiny("llama")
    lm.model.to(HALF[dtype])
    return lm


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_merge_into_a_half_base_folds_in_float32_and_keeps_its_dtype(dtype, method):
    """A half model (no quantize rule) merges as PEFT does: the fold in float32, rounded once to
    the weight's dtype. It was refused as if the weight were quantized."""
    lm = _half(dtype)
    cm = _trained(lm, f"adapt blocks.*.attn.{{q,v}} {method} rank=4 alpha=8")
    merged = cm.merge_adapters()
    path = "model.layers.0.self_attn.v_proj"
    module = cm.program.get_submodule(path)
    w = module.weight.detach().float()
    expected = w + 2.0 * (module.lora_B.detach() @ module.lora_A.detach())
    if method == "dora":
        expected = module.lora_magnitude.detach()[:, None] * expected / expected.norm(dim=1, keepdim=True)
    got = merged.program.get_submodule(path).weight
    assert got.dtype == HALF[dtype] and merged.adapters == {}
    assert torch.equal(got, expected.to(HALF[dtype])), "one rounding of the float32 fold"
    unmerged, folded = _out(cm, lm), _out(merged, lm)
    assert folded.dtype == HALF[dtype]
    # the merged model rounds the weight where the unmerged one rounds activations: half rounding apart
    bound = 3e-3 if dtype == "fp16" else 3e-2
    assert (unmerged.float() - folded.float()).abs().max() < bound


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_into_a_bf16_base_matches_peft_merge_and_unload(method):
    peft = pytest.importorskip("peft")
    from peft_twin import peft_twin

    lm = _half("bf16")
    cm = _trained(lm, f"adapt blocks.*.attn.{{q,v}} {method} rank=4 alpha=8")
    pm = peft_twin(peft, lm.model, cm, rank=4, alpha=8, targets=["q_proj", "v_proj"], dora=method == "dora")
    reference = pm.merge_and_unload()
    merged = cm.merge_adapters()
    for path in cm.adapters:
        want = reference.get_submodule(path).weight
        got = merged.program.get_submodule(path).weight
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-6)  # one bf16 ulp
    with torch.no_grad():
        want = reference(**lm.example_inputs).logits
    assert (_out(merged, lm).float() - want.float()).abs().max() < 2e-2


def test_merge_true_rule_on_a_bf16_model():
    lm = _half("bf16")
    cm = _compile(lm, "adapt blocks.*.attn.{q,v} lora rank=4 merge=true")
    assert cm.adapters == {} and cm.report.rules[0].details["merged"]
    with torch.no_grad():
        expected = lm.model(**lm.example_inputs).logits
    assert torch.equal(_out(cm, lm), expected), "a fresh adapter (B = 0) merges to the same weights"
    assert {p.dtype for p in cm.program.parameters()} == {torch.bfloat16}


def test_merge_still_refused_into_a_weight_stored_in_reduced_precision_by_a_rule():
    """A `quantize … bf16` rule's storage is the precision pass's to re-encode: still refused, with
    the order that works."""
    lm = tiny("llama")
    cm = _trained(lm, "quantize blocks.*.attn.* : Linear bf16\nadapt blocks.*.attn.q lora rank=2")
    with pytest.raises(MergeError, match=r"reduced precision.*then quantize"):
        cm.merge_adapters()


def test_the_merged_models_report_has_its_figures_and_the_merge_after_the_compile(tmp_path):
    """It kept the compile's report: params and bytes counting the adapters it no longer has, and
    "2 lora adapters: 1,024 trainable parameters" for a model with none, through save and load."""
    from slimfx.runtime.sizes import param_bytes

    lm = tiny("llama")
    cm = _compile(lm, "adapt blocks.*.attn.q lora rank=4")
    merged = cm.merge_adapters()
    merged.save(tmp_path / "m")
    for m in (merged, slimfx.load(tmp_path / "m")):
        r = m.report
        assert r.params_after == sum(p.numel() for p in m.parameters()) == cm.report.params_after - 1024
        assert r.bytes_after == param_bytes(m.program) == m.weight_bytes()
        assert [x.policy for x in r.earlier] == [cm.report.policy] and r.earlier[0].rules == cm.report.rules
        (row,) = r.rules
        assert row.text == "merge_adapters()" and row.notes == ("2 adapters merged into their weights",)
        assert (row.params_before, row.params_after) == (1024, 0) and len(row.targets) == 2
    assert "compiled before with policy p: adapt blocks.*.attn.q lora rank=4" in str(merged.report)
