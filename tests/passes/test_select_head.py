"""`head` on models that do not name it as Hugging Face does: a user's decoder (`self.out`),
ALBERT's pooler (the linear itself), and what a model without one is told."""
from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import slimfx
from slimfx.dsl.errors import SpecError


class _Decoder(nn.Module):
    def __init__(self, head: bool = True):
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.stack = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(2))
        self.final = nn.LayerNorm(16)
        self.out = nn.Linear(16, 50) if head else None

    def forward(self, ids):
        x = self.tok(ids)
        for block in self.stack:
            x = x + block(x)
        x = self.final(x)
        return self.out(x) if self.out is not None else x


def _targets(model, rule: str, example) -> list[str]:
    return [t.path for r in slimfx.plan(model, rule, example_inputs=example).rules for t in r.targets]


def test_the_linear_after_every_block_is_a_users_models_head():
    """`keep head` on a decoder whose head is `self.out` was "no head … select `final_norm`"."""
    ids = torch.randint(0, 50, (2, 6))
    assert _targets(_Decoder(), "keep head", ids) == ["out"]
    with pytest.raises(SpecError, match="has no head") as e:  # without it: the norm is no head
        slimfx.plan(_Decoder(head=False), "keep head", example_inputs=ids)
    # `final` is not named as a final norm is (`norm`, `ln_f`, …): not offered as `final_norm`
    assert e.value.hint == "select `blocks[-1]`, or a module path (the last module outside the blocks is `final`)"


def test_a_model_without_blocks_is_offered_only_what_it_has():
    """A plain MLP was told to select `blocks[-1]` or `final_norm`, which it does not have."""
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(SpecError) as e:
        slimfx.plan(mlp, "keep head", example_inputs=torch.randn(3, 4))
    assert "and no linear after the last block" not in e.value.message
    assert e.value.hint == "select a module path (the last module outside the blocks is `2`)"


def test_albert_pooler_is_its_head():
    cfg = transformers.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    albert = transformers.AlbertModel(cfg).eval()
    assert _targets(albert, "keep head", {"input_ids": torch.randint(0, 100, (2, 6))}) == ["pooler"]
