"""runtime/token_ids.py: the token ids are the integer input an embedding reads, named as forward
names it, and the vocabulary's table where several inputs are read by embeddings."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfx
from slimfx.models import tiny
from slimfx.passes.capture import capture
from slimfx.runtime.losses import lm_loss
from slimfx.runtime.token_ids import token_ids_input, token_ids_name


class _Input(nn.Module):
    """PyTorch's usual `forward(self, input)`: fx names the node `input_1`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.out = nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, input):  # noqa: A002 - the name under test
        return self.out(self.embed(input))


class _Positions(nn.Module):
    """Positions read before the tokens, from a smaller table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos, self.tok, self.out = nn.Embedding(16, 16), nn.Embedding(50, 16), nn.Linear(16, 50)

    def forward(self, tokens, positions):
        return self.out(self.pos(positions) + self.tok(tokens))


def test_the_ids_are_named_as_forward_names_them():
    """`input_1` (fx's name) was returned: train said "scores input_1", calib= "missing ['input']"."""
    ids = torch.randint(0, 50, (2, 6))
    assert token_ids_name(capture(_Input().eval(), {"input": ids})) == "input"
    cm = slimfx.compile(_Input().eval(), "adapt out lora rank=2 alpha=4", example_inputs={"input": ids}, calib=ids)
    with torch.no_grad():
        direct = lm_loss(_Input().eval()(ids), {"input": ids}, "input").item()
    assert slimfx.train(cm, [{"input": ids}], steps=1, lr=1e-3).first == pytest.approx(direct, rel=1e-5)


def test_of_several_inputs_read_by_embeddings_the_vocabularys_is_the_ids():
    """`positions`, read first, was taken: loss='lm' trained the model to predict positions."""
    example = {"tokens": torch.randint(0, 50, (2, 6)), "positions": torch.arange(6).expand(2, 6)}
    name, table = token_ids_input(capture(_Positions().eval(), example))
    assert name == "tokens" and table.shape == (50, 16)


@pytest.mark.parametrize("arch, want", [("llama", "input_ids"), ("gpt2", "input_ids"), ("bert", "input_ids"),
                                        ("vit", None)])
def test_the_architectures_ids(arch, want):
    lm = tiny(arch)
    assert token_ids_input(capture(lm.model, lm.example_inputs))[0] == want


class _ArangePositions(nn.Module):
    """Positions made from the ids' length and read first: both tables reach `tokens`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos, self.tok = nn.Embedding(16, 8), nn.Embedding(50, 8)

    def forward(self, tokens):
        return self.pos(torch.arange(tokens.shape[1])) + self.tok(tokens)


def test_the_vocabulary_is_the_largest_table_the_ids_reach():
    """The first table read was taken: the position table, 16 rows, for a vocabulary of 50 (the
    causal probe then drew ids from 16 of them)."""
    name, table = token_ids_input(capture(_ArangePositions().eval(), {"tokens": torch.randint(0, 50, (2, 6))}))
    assert name == "tokens" and table.shape == (50, 8)
