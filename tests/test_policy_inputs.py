"""What check_policy draws (policy_inputs.py): batch, length and padding within what the compiled
graph and the original model take; inputs built like the example inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfx.models import tiny
from slimfx.testing import PolicyCheckError, check_policy

from policy_check_tiny import FEW, bert, llama, quantize  # noqa: F401 - fixtures


def test_vit_draws_batch_only_and_passes_int8():
    result = check_policy(tiny("vit"), quantize("int8"), rtol=0, atol=0.02, max_examples=FEW)
    assert {d.seq for d in result.draws} == {None}
    assert {d.padding for d in result.draws} == {"none"}
    assert len({d.batch for d in result.draws}) > 1


def test_draws_cover_padding_and_shapes(bert):
    result = check_policy(bert, quantize("int8"), rtol=0, atol=0.02, max_examples=25)
    draws = result.draws
    assert any(d.padding == "left" and any(d.pads) for d in draws)
    assert any(d.padding == "right" and any(d.pads) for d in draws)
    assert any(d.padding == "none" for d in draws)
    assert len({d.batch for d in draws}) > 1 and len({d.seq for d in draws}) > 2
    for d in draws:  # every row keeps a real token; sizes within the defaults and bert's 128 positions
        assert all(0 <= p < d.seq for p in d.pads) and 1 <= d.batch <= 4 and 1 <= d.seq <= 32


def test_labels_are_ignored_at_padded_positions(llama):
    """labels got the pad id at padding, so the loss counted padded positions that `tokens unpad`
    (exact at real tokens) computes differently."""
    example = dict(llama.example_inputs, labels=llama.example_inputs["input_ids"].clone())
    result = check_policy(llama.model, "tokens unpad", example_inputs=example, rtol=1e-4, atol=1e-4,
                          max_examples=20, seed=3)
    assert any(d.padding != "none" for d in result.draws)


def test_lengths_past_the_position_table_are_never_drawn():
    """RoBERTa's positions start after its padding index: the config's max_position_embeddings
    allowed lengths the original refuses, and the empty policy 'departed' there."""
    roberta = tiny("roberta")
    limit = roberta.model.config.max_position_embeddings - roberta.model.config.pad_token_id - 1
    result = check_policy(roberta, "", rtol=0, atol=0, max_seq=limit + 50, max_examples=30, seed=0)
    assert max(d.seq for d in result.draws) <= limit


def test_an_original_that_takes_no_drawn_input_is_said_before_drawing():
    class BrokenWhenCalled(torch.nn.Module):  # captures (export traces it), fails when called
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def forward(self, input_ids, attention_mask):
            if not torch.compiler.is_exporting():
                raise ValueError("broken outside export")
            return self.embed(input_ids)

    example = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"the original model raised ValueError: broken outside export on the "
                                         r"simplest input drawn like the example inputs \(batch=1, seq=1, "):
        check_policy(BrokenWhenCalled(), "", example_inputs=example)


def test_a_model_without_a_mask_is_not_described_with_one():
    class TokenMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)

        def forward(self, input_ids):
            return self.fc(self.embed(input_ids))

    torch.manual_seed(0)
    with pytest.raises(PolicyCheckError) as info:
        check_policy(TokenMLP().eval(), "quantize fc int2 group=16", rtol=0, atol=1e-3, max_examples=5,
                     example_inputs={"input_ids": torch.randint(0, 50, (2, 8))})
    assert "smallest failing input: batch=1, seq=1, seed=0" in str(info.value)
    assert "attention_mask" not in str(info.value) and info.value.draw.mask is None


class FixedLength(torch.nn.Module):
    """A classifier over exactly 8 tokens (flatten, then one linear): its graph fixes the length."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(8 * 16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.head(h.reshape(h.shape[0], 8 * 16))


def test_a_length_the_graph_fixed_is_the_only_one_drawn():
    """Lengths 1..32 were drawn and the original's error at length 1 blamed the example inputs."""
    example = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    result = check_policy(FixedLength().eval(), "", example_inputs=example, rtol=0, atol=0, max_examples=FEW, seed=0)
    assert {d.seq for d in result.draws} == {8} and len({d.batch for d in result.draws}) > 1
    with pytest.raises(ValueError, match=r"no seq size to draw.*allows seq >= 8, the limit is 4 \(raise max_seq\)"):
        check_policy(FixedLength().eval(), "", example_inputs=example, max_seq=4, max_examples=FEW, seed=0)


def test_a_classifiers_labels_are_drawn_from_its_classes():
    """labels were drawn from the vocabulary: "Target 39 is out of bounds" on the first draw."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    example = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
               "labels": torch.tensor([0, 2])}
    result = check_policy(model, quantize("int8"), example_inputs=example, rtol=0, atol=0.05, max_examples=FEW, seed=0)
    assert len(result.draws) == FEW


class _KeyPadding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn = nn.Embedding(50, 16), nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, input_ids, key_padding_mask):
        x = self.emb(input_ids)
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


def test_a_key_padding_mask_is_true_at_padding():
    """PyTorch's key_padding_mask is True at padding: it was built like an attention mask, all
    True where nothing is padded, so every key was masked and both models gave NaN (which matches
    NaN: the check passed on nothing)."""
    torch.manual_seed(0)
    example = {"input_ids": torch.randint(0, 50, (2, 8)), "key_padding_mask": torch.zeros(2, 8, dtype=torch.bool)}
    result = check_policy(_KeyPadding().eval(), "", example_inputs=example, max_examples=10, seed=1,
                          metric=lambda original, compiled: bool(torch.isfinite(original).all()))
    assert any(any(d.pads) for d in result.draws)
    assert "key_padding_mask masks nothing" in result.draws[0].describe()
