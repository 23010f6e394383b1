"""plan's token-attention checks (passes/token_attention.py) on which attention counts: only one
after the step, and exactly one in the block score=attention reads. compile refuses the same
cases later, inside the pass, so only plan tells a dropped check apart (mutation audit)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimfx
from slimfx.dsl.errors import SpecError


class _Block(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, h, mask):
        B, S, D = h.shape
        q, k, v = (f(h).view(B, S, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        m = mask[:, None, None, :].bool()
        if self.kind == "by_hand":
            a = ((q @ k.transpose(-1, -2)) / 8 ** 0.5).masked_fill(~m, float("-inf")).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            if self.kind == "twice":  # a second attention over the first one's output
                a = F.scaled_dot_product_attention(a, k, v, attn_mask=m)
        return h + self.o(a.transpose(1, 2).reshape(B, S, D))


class _Model(nn.Module):
    def __init__(self, kinds):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([_Block(k) for k in kinds])

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask)
        return h


EXAMPLE = {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0)),
           "attention_mask": torch.ones(2, 6, dtype=torch.long)}


def test_plan_refuses_a_step_whose_later_attention_is_written_out_by_hand():
    """Blocks 0 and 1 run scaled_dot_product_attention, block 2 by hand: after block 1 nothing runs
    per sequence. An attention before the step (block 0's, 1's) does not count."""
    model = _Model(["sdpa", "sdpa", "by_hand"]).eval()
    with pytest.raises(SpecError, match="needs an attention that runs per sequence after layers.1"):
        slimfx.plan(model, "tokens after blocks[1] prune keep=0.5 score=norm", example_inputs=EXAMPLE)
    slimfx.plan(model, "tokens after blocks[0] prune keep=0.5 score=norm", example_inputs=EXAMPLE)


def test_plan_refuses_scoring_by_a_block_with_two_attentions():
    """score=attention reads the block's one attention; with two it cannot say which."""
    model = _Model(["twice", "sdpa", "sdpa"]).eval()
    with pytest.raises(SpecError, match="it has 2 such ops"):
        slimfx.plan(model, "tokens after blocks[0] prune keep=0.5 score=attention", example_inputs=EXAMPLE)
    slimfx.plan(model, "tokens after blocks[0] prune keep=0.5 score=norm", example_inputs=EXAMPLE)
