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
    assert e.value.hint == "select a module path"  # not `2`: no selector can start with a number


def test_albert_pooler_is_its_head():
    cfg = transformers.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    albert = transformers.AlbertModel(cfg).eval()
    assert _targets(albert, "keep head", {"input_ids": torch.randint(0, 100, (2, 6))}) == ["pooler"]


def test_a_linear_in_a_second_stack_is_no_head():
    """The last linear after the blocks was `dec.1.c`, inside a second ModuleList."""

    class Mixer(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.a, self.c = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            return x + self.c(self.a(x))

    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.enc = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(4))
            self.dec = nn.ModuleList(Mixer() for _ in range(2))

        def forward(self, ids):
            x = self.emb(ids)
            for block in self.enc:
                x = x + block(x)
            for block in self.dec:
                x = block(x)
            return x

    with pytest.raises(SpecError, match="has no head") as e:
        slimfx.plan(TwoStacks(), "keep head", example_inputs=torch.randint(0, 50, (2, 6)))
    assert e.value.hint == "select `blocks[-1]`, or a module path (the last module outside the blocks is `dec[1].c`)"
