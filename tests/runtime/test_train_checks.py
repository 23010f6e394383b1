"""slimfx.train's refusals of what would train nothing or the wrong thing, and the batches it
passes on: labels a graph was captured with reach it; next-token loss on a bidirectional model,
an optimizer over other tensors, frozen adapters, a teacher that is no model are each refused."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import slimfx
from slimfx import models

ADAPT = "adapt blocks.*.attn.{q,v} lora rank=4 alpha=8"


def _batch(**more):
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **more}


def _direct_lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def test_a_graph_captured_with_labels_is_given_them_and_trains():
    """A Hugging Face training batch (labels beside the ids) as the example: train() took the
    labels out of every call, and the graph refused the call for lacking them."""
    lm = models.tiny("llama")
    batch = _batch()
    batch["labels"] = batch["input_ids"]
    cm = slimfx.compile(lm.model, ADAPT, example_inputs=batch)
    assert "labels" in cm.input_names
    with torch.no_grad():
        want = _direct_lm_loss(cm(**batch).logits, batch["input_ids"]).item()
    result = slimfx.train(cm, [batch], steps=2, lr=1e-2)
    assert result.first == pytest.approx(want, rel=1e-5)
    assert slimfx.train(cm, [batch], steps=1, loss="distill", teacher=lm.model).losses


def _masked_lm():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32)).eval()


def test_next_token_loss_on_a_bidirectional_model_is_refused_and_distill_is_not():
    """A masked LM sees the token it is asked to predict: the lm loss fell by copying it, silently."""
    model, batch = _masked_lm(), _batch()
    cm = slimfx.compile(model, "adapt blocks.*.attn.{q,v} lora rank=4 alpha=8", example_inputs=batch)
    before = [p.detach().clone() for p in cm.adapter_parameters()]
    with pytest.raises(ValueError, match=r"read the tokens after it .*loss='distill'"):
        slimfx.train(cm, [batch], steps=2, lr=1e-2)
    assert all(torch.equal(p, b) for p, b in zip(cm.adapter_parameters(), before))
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.add_(0.01)  # a student that differs from its teacher
    assert slimfx.train(cm, [batch], steps=1, loss="distill", teacher=model).losses


def test_next_token_loss_on_a_causal_model_of_ones_own_is_not_refused():
    lm = models.tiny("llama")
    cm = slimfx.compile(lm, ADAPT)
    root = cm.graph.modules[""]  # no GenerationMixin among its classes: the probe decides
    cm.graph.modules[""] = dataclasses.replace(root, classes=("MyLM", "Module", "object"))
    assert slimfx.train(cm, [_batch()], steps=1, lr=1e-3).losses


@pytest.fixture(scope="module")
def cm_and_lm():
    lm = models.tiny("llama")
    return slimfx.compile(lm, ADAPT), lm


def test_an_optimizer_over_other_tensors_or_a_class_is_refused(cm_and_lm):
    cm, lm = cm_and_lm
    other = copy.deepcopy(cm)
    with pytest.raises(ValueError, match=r"holds none of this model's adapters"):
        slimfx.train(cm, [lm.example_inputs], steps=1, optimizer=torch.optim.AdamW(other.adapter_parameters()))
    with pytest.raises(TypeError, match=r"optimizer= takes an optimizer built over the adapters"):
        slimfx.train(cm, [lm.example_inputs], steps=1, optimizer=torch.optim.AdamW)


def test_frozen_adapters_and_a_teacher_that_is_no_model_are_refused(cm_and_lm):
    cm, lm = cm_and_lm
    with pytest.raises(TypeError, match=r"teacher= is the model to learn from.*'gpt2'"):
        slimfx.train(cm, [lm.example_inputs], steps=1, loss="distill", teacher="gpt2")
    frozen = copy.deepcopy(cm)
    for p in frozen.adapter_parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"every adapter of this model is frozen"):
        slimfx.train(frozen, [lm.example_inputs], steps=1)


def test_a_small_loss_is_printed_in_significant_digits():
    from slimfx.runtime.train import TrainResult

    assert str(TrainResult([6.6e-07, 1.0e-06], 0.5, "distill")).endswith("6.600e-07 -> 1.000e-06")
