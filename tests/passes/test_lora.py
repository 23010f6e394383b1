"""The LoRA/DoRA rewrite primitive (passes/lora.py), through `adapt` rules: identity at init on
every architecture, the adapter math against a direct implementation of the papers' formulas,
tags, and a later `quantize` touching the base weight only."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfx
from slimfx.models import tiny
from slimfx.runtime import ops  # noqa: F401 - registers the slimfx:: ops
from slimfx.runtime.adapters import tag_of
from slimfx.runtime.compiled import CompiledModel

QUANT = torch.ops.slimfx.quant_linear.default


def _policy(rules: str) -> str:
    return "policy p {\n" + rules + "\n}"


def _out(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result[0]


def _run(cm, lm) -> torch.Tensor:
    with torch.no_grad():
        return _out(cm(**lm.example_inputs))


def _randomize(cm: CompiledModel, seed: int = 0, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fresh_adapter_is_bit_identical_on_every_arch(arch, method):
    lm = tiny(arch)
    cm = slimfx.compile(lm, _policy(f"adapt blocks.*.** : Linear {method} rank=4 alpha=8"))
    with torch.no_grad():
        expected = _out(lm.model(**lm.example_inputs))
    assert torch.equal(_run(cm, lm), expected)
    assert len(cm.adapters) == len(cm.report.rules[0].targets) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fresh_adapter_over_quantized_base_is_identity(arch, method):
    lm = tiny(arch)
    quantized = slimfx.compile(lm, _policy("quantize blocks.*.** : Linear int4 group=16"))
    cm = slimfx.compile(lm, _policy(f"quantize blocks.*.** : Linear int4 group=16\nadapt blocks.*.** : Linear {method} rank=4"))
    assert torch.equal(_run(cm, lm), _run(quantized, lm))
    bases = {tag_of(n) is None for n in cm.program.graph.nodes if n.target is QUANT}
    assert bases == {True}, "the base call stays its own, untagged quant_linear node"


# ---- the math, against a direct implementation of the papers' formulas ------------------------


class _OneLinear(nn.Module):
    """A model that is one linear layer (nn.Linear, or GPT-2's Conv1D storing [in, out])."""

    def __init__(self, conv1d: bool):
        super().__init__()
        torch.manual_seed(1)
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.proj = Conv1D(6, 5)  # nf=6 outputs, nx=5 inputs
            nn.init.normal_(self.proj.bias)
        else:
            self.proj = nn.Linear(5, 6)

    def forward(self, x):
        return self.proj(x)


def _direct(module: nn.Module, x, adapter, a, b, m):
    """LoRA (Hu et al. 2021): W' = W + (α/r)·B·A. DoRA (Liu et al. 2024, eq. 5):
    W' = m · (W + ΔW) / ‖W + ΔW‖_c with the norm per output unit. y = x·W'ᵀ + bias."""
    w = module.proj.weight.detach()
    w = w.T if adapter.transposed else w  # [out, in]
    merged = w + adapter.scale * (b @ a)
    if adapter.method == "dora":
        merged = m[:, None] * merged / merged.norm(dim=1, keepdim=True)
    return x @ merged.T + module.proj.bias.detach()


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_math_matches_the_papers(conv1d, method):
    model = _OneLinear(conv1d)
    x = torch.randn(3, 4, 5)
    cm = slimfx.compile(model, _policy(f"adapt proj {method} rank=2 alpha=3"), example_inputs={"x": x})
    _randomize(cm)
    adapter = cm.adapters["proj"]
    assert adapter.transposed is conv1d and adapter.scale == 1.5
    owner = cm.program.get_submodule("proj")
    a, b = owner.lora_A.detach(), owner.lora_B.detach()
    m = owner.lora_magnitude.detach() if method == "dora" else None
    assert a.shape == (2, 5) and b.shape == (6, 2)
    with torch.no_grad():
        got = cm(x)
    torch.testing.assert_close(got, _direct(model, x, adapter, a, b, m), rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, model(x)), "random adapters must change the output"


def test_dora_on_a_weight_with_an_all_zero_row_keeps_that_output_finite_and_zero():
    """OPT's and Gemma 2's tied head has the padding token's row all zeros: DoRA's m/‖W + s·B·A‖
    was 0/0 there, and that logit NaN (PEFT's too) from a fresh adapter on, merged or not."""
    model = _OneLinear(False)
    with torch.no_grad():
        model.proj.weight[2] = 0.0
    x = torch.randn(3, 4, 5)
    cm = slimfx.compile(model, _policy("adapt proj dora rank=2 alpha=3"), example_inputs={"x": x})
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))  # fresh: every output bit as the model's
    _randomize(cm)
    owner = cm.program.get_submodule("proj")
    with torch.no_grad():
        owner.lora_B[2] = 0.0  # the row of W + s·B·A stays zero; its magnitude is not
    a, b, m = owner.lora_A.detach(), owner.lora_B.detach(), owner.lora_magnitude.detach()
    with torch.no_grad():
        got = cm(x)
        merged = cm.merge_adapters()(x)
    bias = model.proj.bias.detach()
    assert got.isfinite().all() and merged.isfinite().all()
    assert torch.equal(got[..., 2], bias[2].expand(3, 4))  # the zero row gives the bias alone
    rows = [i for i in range(6) if i != 2]
    want = _direct(model, x, cm.adapters["proj"], a, b, m)
    torch.testing.assert_close(got[..., rows], want[..., rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, got, rtol=1e-5, atol=1e-5)


def test_adapter_params_are_named_where_they_live_and_nodes_tagged():
    lm = tiny("llama")
    cm = slimfx.compile(lm, _policy("adapt blocks.*.attn.{q,v} dora rank=4 alpha=8"))
    names = {n for n, _ in cm.program.named_parameters() if "lora" in n}
    assert "model.layers.0.self_attn.q_proj.lora_A" in names
    assert "model.layers.1.self_attn.v_proj.lora_magnitude" in names
    assert len(names) == 4 * 3
    tagged = [tag_of(n) for n in cm.program.graph.nodes if tag_of(n) is not None]
    assert {t["target"] for t in tagged} == set(cm.adapters)
    for path in cm.adapters:
        parts = {t["part"] for t in tagged if t["target"] == path}
        assert {"lora_A", "lora_B", "lora_magnitude", "A", "B", "weight", "out"} <= parts


# ---- a later `quantize` ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_quantize_after_adapt_packs_the_base_weight_only(method):
    lm = tiny("gpt2")
    policy = _policy(f"adapt blocks.*.** : Linear {method} rank=4 merge=false\nquantize blocks.*.** : Linear int4 group=16")
    cm = slimfx.compile(lm, policy)
    params = dict(cm.program.named_parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in cm.adapter_parameters())
    assert not [n for n in params if n.endswith("c_attn.weight") or n.endswith("c_fc.weight")], \
        "no full-precision base weight of an adapted target may stay behind"
    quant = [n for n in cm.program.graph.nodes if n.target is QUANT]
    assert len(quant) == len(cm.adapters) and all(tag_of(n) is None for n in quant)
    dequant = [n for n in cm.program.graph.nodes if n.target is torch.ops.slimfx.dequantize.default]
    assert len(dequant) == (len(cm.adapters) if method == "dora" else 0)
    if method == "lora":  # B = 0: exactly the quantized model
        plain = slimfx.compile(lm, _policy("quantize blocks.*.** : Linear int4 group=16"))
        assert torch.equal(_run(cm, lm), _run(plain, lm))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dora_over_quantized_base_reads_the_dequantized_weight(conv1d):
    """DoRA's column norm uses the weight the base computes with: after `quantize`, the packed one."""
    model = _OneLinear(conv1d)
    x = torch.randn(3, 4, 5)
    cm = slimfx.compile(model, _policy("adapt proj dora rank=2\nquantize proj int4 group=16"), example_inputs={"x": x})
    _randomize(cm)
    q = cm.program.get_submodule("proj")
    w = torch.ops.slimfx.dequantize(q.qweight, q.scales, getattr(q, "zeros", None), 4, 16, 5)
    merged = w + cm.adapters["proj"].scale * (q.lora_B @ q.lora_A)
    expected = x @ (q.lora_magnitude[:, None] * merged / merged.norm(dim=1, keepdim=True)).T + q.bias
    with torch.no_grad():
        torch.testing.assert_close(cm(x), expected.detach(), rtol=1e-5, atol=1e-5)


# ---- a half-precision model --------------------------------------------------------------------

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dora_on_a_half_model_outputs_the_model_dtype_and_the_papers_value(conv1d, dtype):
    """The adapters stay fp32 on a half model; DoRA's output must still be in the base's dtype
    (it came out float32, and sdpa then refused q in fp32 beside a half k) and within half rounding
    of DoRA's formula computed in float32 from the same half weights."""
    model = _OneLinear(conv1d).to(HALF[dtype])
    x = torch.randn(3, 4, 5).to(HALF[dtype])
    cm = slimfx.compile(model, _policy("adapt proj dora rank=2 alpha=3"), example_inputs={"x": x})
    _randomize(cm)
    owner = cm.program.get_submodule("proj")
    assert {p.dtype for p in cm.adapter_parameters()} == {torch.float32}
    with torch.no_grad():
        got = cm(x)
    assert got.dtype == HALF[dtype]
    a, b, m = owner.lora_A.detach(), owner.lora_B.detach(), owner.lora_magnitude.detach()
    full = _OneLinear(conv1d)
    full.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    expected = _direct(full, x.float(), cm.adapters["proj"], a, b, m)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fresh_dora_on_a_half_llama_is_bit_identical_and_runs(dtype):
    lm = tiny("llama")
    lm.model.to(HALF[dtype])
    cm = slimfx.compile(lm, _policy("adapt blocks.*.** : Linear dora rank=4 alpha=8"))
    with torch.no_grad():
        expected = _out(lm.model(**lm.example_inputs))
    got = _run(cm, lm)
    assert got.dtype == HALF[dtype] and torch.equal(got, expected)


@pytest.mark.parametrize("dtype, bound", [("fp16", 3e-3), ("bf16", 2e-2)])
def test_dora_on_a_half_llama_matches_peft(dtype, bound):
    """Against PEFT's DoRA on the same half model (its adapters fp32, as slimfx's): the outputs
    agree to half rounding (measured 6e-4 in fp16, 6e-3 in bf16, about LoRA's own distance from
    PEFT; the adapters move the logits by about 0.7)."""
    peft = pytest.importorskip("peft")
    from peft_twin import peft_twin

    lm = tiny("llama")
    lm.model.to(HALF[dtype])
    cm = slimfx.compile(lm, _policy("adapt blocks.*.attn.{q,v} dora rank=4 alpha=8"))
    _randomize(cm)
    pm = peft_twin(peft, lm.model, cm, rank=4, alpha=8, targets=["q_proj", "v_proj"], dora=True)
    with torch.no_grad():
        want = _out(pm(**lm.example_inputs))
        plain = _out(lm.model(**lm.example_inputs))
    got = _run(cm, lm)
    assert got.dtype == want.dtype == HALF[dtype]
    assert (want.float() - plain.float()).abs().max() > 0.1, "the adapters must move the outputs"
    assert (got.float() - want.float()).abs().max() < bound


@pytest.mark.parametrize("order", ["adapt-first", "quantize-first"])
def test_dora_with_dropout_beside_a_quantized_half_base_runs_in_training(order):
    """Dropout makes DoRA multiply its own copy of the weight with the half activations: the
    dequantized weight (float32) is cast to their dtype, also when a later `quantize` swaps it in."""
    lm = tiny("llama")
    lm.model.to(torch.bfloat16)
    rules = ["adapt blocks.*.attn.{q,v} dora rank=4 dropout=0.1 merge=false",
             "quantize blocks.*.attn.* : Linear int4 group=16"]
    cm = slimfx.compile(lm, _policy("\n".join(rules if order == "adapt-first" else rules[::-1])))
    cm.train()
    out = _out(cm(**lm.example_inputs))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.grad is not None for p in cm.adapter_parameters())


def test_a_rule_on_a_peft_models_adapter_layer_says_so():
    """It was refused as 'an earlier compile quantized it' (no compile had): the selected module
    is PEFT's wrapper, whose weight is its base_layer's."""
    peft = pytest.importorskip("peft")
    lm = tiny("llama")
    model = peft.get_peft_model(lm.model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    with pytest.raises(slimfx.SpecError, match=r"(?s)q_proj: it is a PEFT adapter layer.*merge_and_unload\(\)"):
        slimfx.compile(model, "quantize blocks.*.attn.q int8", example_inputs=lm.example_inputs)
