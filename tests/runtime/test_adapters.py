"""Adapters in a CompiledModel (runtime/adapters.py): trainable parameters, dropout on only in
training mode, artifacts that keep adapters bit-identical and trainable."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.models import tiny
from slimfx.runtime.adapters import Adapter


def _compile(lm, rules: str):
    return slimfx.compile(lm, "policy p {\n" + rules + "\n}")


def test_only_adapter_parameters_are_trainable():
    lm = tiny("llama")
    cm = _compile(lm, "quantize blocks.*.mlp.* : Linear int4 group=16\nadapt blocks.*.attn.{q,v} lora rank=4")
    trainable = [n for n, p in cm.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"program.{n}" for n, _ in cm.program.named_parameters()
                                       if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    assert len(cm.adapter_parameters()) == 2 * 2 * 2
    assert cm.adapters["model.layers.1.self_attn.v_proj"] == Adapter(
        "model.layers.1.self_attn.v_proj", "lora", 4, 16.0, 0.0, False)


def test_dropout_only_in_training_mode():
    lm = tiny("llama")
    cm = _compile(lm, "adapt blocks.*.attn.{q,v} lora rank=4 dropout=0.5")
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.add_(0.3)
        eval_out = cm(**lm.example_inputs).logits
        cm.train()
        torch.manual_seed(0)
        train_a = cm(**lm.example_inputs).logits
        torch.manual_seed(1)
        train_b = cm(**lm.example_inputs).logits
        cm.eval()
        again = cm(**lm.example_inputs).logits
    assert not torch.equal(train_a, train_b), "dropout draws a new mask per call in training"
    assert torch.equal(eval_out, again), "eval mode is deterministic again"


def test_dora_with_dropout_in_eval_is_the_same_adapter_without_it():
    """In eval DoRA's base term is PEFT's `y − bias`: with dropout it recomputed W·x, 1.8e-3 off the
    CPU int4 kernel's y (the same weights with dropout=0) under backend="auto"."""
    lm = tiny("llama")
    rules = "quantize blocks.*.attn.{q,v} : Linear int4 group=32\nadapt blocks.*.attn.{q,v} dora rank=4 dropout="
    plain, dropped = _compile(lm, rules + "0"), _compile(lm, rules + "0.1")
    assert "int4pack" in str(dropped.lowering)
    torch.manual_seed(0)
    with torch.no_grad():
        own = dict(dropped.program.named_parameters())
        for name, p in plain.program.named_parameters():
            if "lora" in name:
                p.add_(torch.randn_like(p) * 0.1)
                own[name].copy_(p)
        assert torch.equal(plain(**lm.example_inputs).logits, dropped(**lm.example_inputs).logits)


def test_artifact_keeps_adapters_bit_identical_and_trainable(tmp_path):
    lm = tiny("gpt2")
    cm = _compile(lm, "quantize blocks.*.mlp.* : Linear int4 group=16\nadapt blocks.*.** : Linear dora rank=4 dropout=0.1")
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cm.save(tmp_path / "a")
    loaded = slimfx.load(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(**lm.example_inputs).logits, cm(**lm.example_inputs).logits)
    assert loaded.adapters == cm.adapters
    assert [p.requires_grad for p in loaded.adapter_parameters()] == [True] * len(cm.adapter_parameters())
    for a, b in zip(loaded.adapter_parameters(), cm.adapter_parameters()):
        assert torch.equal(a, b)
    loaded.train()
    loss = loaded(**lm.example_inputs).logits.square().mean()
    loss.backward()
    assert all(p.grad is not None for p in loaded.adapter_parameters())


def _moved_adapters_and_peft_twin(method: str, dropout: float):
    """A tiny Llama adapted on q and v, its adapters moved off their fresh values, and PEFT's
    model holding the same adapters: (peft, lm, cm, twin)."""
    peft = pytest.importorskip("peft")
    from peft_twin import peft_twin

    lm = tiny("llama")
    cm = _compile(lm, f"adapt blocks.*.attn.{{q,v}} {method} rank=4 alpha=8 dropout={dropout}")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    twin = peft_twin(peft, lm.model, cm, rank=4, alpha=8, targets=["q_proj", "v_proj"], dora=method == "dora",
                     dropout=dropout)
    return peft, lm, cm, twin


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_with_dropout_matches_peft_mask_for_mask(method):
    """In training both draw the same masks from the same seed (one dropout per adapted linear, in
    call order), so the outputs must agree: DoRA's base term then uses the dropped-out input, W·dropout(x),
    as PEFT's does — and in eval neither computes it (PEFT's `y − bias`)."""
    peft, lm, cm, twin = _moved_adapters_and_peft_twin(method, dropout=0.5)
    for m in twin.modules():  # the adapted layers train; the model's own stay in eval, as compile captured them
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.train()
    cm.train()
    runs = []
    for model in (twin, cm):
        torch.manual_seed(1)
        with torch.no_grad():
            runs.append(model(**lm.example_inputs).logits)
    twin.eval(), cm.eval()
    with torch.no_grad():
        eval_twin, eval_cm = twin(**lm.example_inputs).logits, cm(**lm.example_inputs).logits
    assert (runs[0] - eval_twin).abs().max() > 1e-3, "dropout must move the training outputs"
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eval_cm, eval_twin, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_gradients_match_peft(method):
    """What training follows: one backward of the same loss through both. PEFT detaches DoRA's
    norm ‖W + s·B·A‖ (the paper's memory saving); differentiated through, the gradients differed
    from PEFT's by up to half while every forward agreed."""
    _, lm, cm, twin = _moved_adapters_and_peft_twin(method, dropout=0.0)
    for model in (twin, cm):
        model(**lm.example_inputs).logits.square().mean().backward()
    ours = dict(cm.program.named_parameters())
    compared = 0
    for name, p in twin.named_parameters():
        if "lora_" in name:
            path, _, kind = name.removeprefix("base_model.model.").partition(".lora_")
            mine = ours[f"{path}.lora_{kind.split('.')[0].removesuffix('_vector')}"]
            torch.testing.assert_close(mine.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
            compared += 1
    assert compared == 2 * 2 * (3 if method == "dora" else 2)  # 2 blocks × q, v × A, B (and the magnitude)


def test_dora_with_dropout_multiplies_by_the_weight_again_only_in_training():
    """Eval computed W·(dropout(x) − x) = W·0 beside every adapted linear (one matmul each, which
    PEFT skips in eval); the term is now in the graph only while the model trains."""
    lm = tiny("llama")
    rules = "adapt blocks.*.attn.{q,v} dora rank=4 dropout="
    plain, dropped = _compile(lm, rules + "0"), _compile(lm, rules + "0.1")

    def matmuls(cm):
        return sum(n.target is torch.ops.aten.linear.default for n in cm.program.graph.nodes)

    sites = 2 * len(lm.model.model.layers)
    assert matmuls(dropped) == matmuls(plain)
    dropped.train()
    assert matmuls(dropped) == matmuls(plain) + sites
    dropped.eval()
    assert matmuls(dropped) == matmuls(plain)


def test_a_dora_model_in_training_mode_compiles_again_from_its_eval_form():
    """The copy carried DoRA's training-only base term (nodes without metadata: a LintError) and
    adapter dropout switched on, which later rules' calibration would have drawn masks from."""
    lm = tiny("llama")
    cm = _compile(lm, "adapt blocks.*.attn.{q,v} dora rank=4 dropout=0.1")
    again_from_eval = slimfx.compile(cm, "quantize blocks.*.mlp.* : Linear int8")
    cm.train()
    again = slimfx.compile(cm, "quantize blocks.*.mlp.* : Linear int8")
    assert cm.training, "the model compiled again is left as it was"
    with torch.no_grad():
        assert torch.equal(again(**lm.example_inputs).logits, again_from_eval(**lm.example_inputs).logits)
    cm.eval()


def test_kernels_lowered_in_training_mode_come_from_the_eval_graph():
    """set_backend("triton") in training mode generated kernels from the training graph: every eval
    call after kept DoRA's W·(dropout(x) − x) = 0, one matmul per adapted linear."""
    lm = tiny("llama")
    cm = _compile(lm, "adapt blocks.*.attn.{q,v} dora rank=4 dropout=0.5")
    cm.set_backend("triton")
    lowered_in_eval = sum(n.target is torch.ops.aten.linear.default for n in cm.program.graph.nodes)
    cm.set_backend("eager")
    cm.train()
    cm.set_backend("triton")
    cm.eval()
    assert sum(n.target is torch.ops.aten.linear.default for n in cm.program.graph.nodes) == lowered_in_eval
    with torch.no_grad():
        got = cm(**lm.example_inputs).logits
        cm.set_backend("eager")
        torch.testing.assert_close(got, cm(**lm.example_inputs).logits, rtol=1e-5, atol=1e-5)
