"""`plan` refuses a token rule that finds no attention running per sequence, as compile does:
it said "ready" for Gemma 2 (attention written out by hand) and BERT with eager attention, and
compile then failed inside the token pass."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimfx
from slimfx.dsl.errors import SpecError
from slimfx.models import tiny


def _refused(model, policy, example, *words):
    with pytest.raises(SpecError) as e:
        slimfx.plan(model, policy, example_inputs=example)
    assert e.value.diagnostics[0].kind == "unsupported"
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("arch, policy", [
    ("gemma2", "tokens after blocks[0] prune keep=0.5 score=norm"),
    ("bert-eager", "tokens after blocks[0] merge ratio=0.3"),
])
def test_a_model_whose_attention_is_written_out_by_hand_is_refused_by_plan(arch, policy):
    lm = tiny("bert", layers=2, attn_implementation="eager") if arch == "bert-eager" else tiny(arch, layers=2)
    _refused(lm.model, policy, lm.example_inputs, "needs an attention that runs per sequence after",
             "attention written out by hand", 'attn_implementation="sdpa"')


class _Block(nn.Module):
    def __init__(self, by_hand: bool):
        super().__init__()
        self.by_hand = by_hand
        self.q, self.k, self.v, self.o, self.up = (nn.Linear(16, 16) for _ in range(5))

    def forward(self, h, mask):
        B, S, D = h.shape
        q, k, v = (f(h).view(B, S, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        m = mask[:, None, None, :].bool()
        if self.by_hand:
            a = ((q @ k.transpose(-1, -2)) / 8 ** 0.5).masked_fill(~m, float("-inf")).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        h = h + self.o(a.transpose(1, 2).reshape(B, S, D))
        return h + self.up(h)


class _FirstByHand(nn.Module):
    """Block 0's attention written out by hand, the others scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([_Block(True), _Block(False), _Block(False)])

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask)
        return h


EXAMPLE = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def test_scoring_by_the_attention_of_a_block_that_has_none_per_sequence_is_refused_by_plan():
    _refused(_FirstByHand().eval(), "tokens after blocks[0] prune keep=0.5 score=attention", EXAMPLE,
             "reads the attention of layers.0", "it has none", "use `score=norm`")
    with pytest.raises(SpecError, match="reads the attention of layers.0"):  # compile says the same, first
        slimfx.compile(_FirstByHand().eval(), "tokens after blocks[0] prune keep=0.5 score=attention",
                       example_inputs=EXAMPLE, calib=[EXAMPLE])


def test_rules_that_find_their_attention_still_plan_and_compile():
    model = _FirstByHand().eval()
    for policy in ("tokens after blocks[0] prune keep=0.5 score=norm",
                   "tokens after blocks[1] prune keep=0.5 score=attention"):
        slimfx.plan(model, policy, example_inputs=EXAMPLE)
        cm = slimfx.compile(model, policy, example_inputs=EXAMPLE, calib=[EXAMPLE])
        with torch.no_grad():
            assert cm(**EXAMPLE).shape == (2, 3, 16)  # keep=0.5 of 6 tokens, the model's own output cut
