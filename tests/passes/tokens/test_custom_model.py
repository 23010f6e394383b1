"""Token rules on a hand-written encoder that takes token ids alone (no attention_mask): every
token is real, and the sequence length varies from call to call. Against a direct run (tome_ref.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimfx

from tome_ref import _run_blocks, merge_tokens, prune_tokens


class _Block(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm, self.q, self.k, self.v, self.o = nn.LayerNorm(d), *(nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm(x)
        split = lambda y: y.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        return x + self.o(att.transpose(1, 2).reshape(b, t, d))


class _IdsOnly(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        # positions: without them a repeated id gives equal rows, whose exact similarity ties
        # ToMe may break either way
        self.position = nn.Parameter(torch.randn(16, 32))
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, input_ids):
        x = self.embed(input_ids) + self.position[:input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return x


RULES = {"prune": ("tokens after blocks[0] prune keep=0.5 score=norm protect=none restore=true",
                   lambda x, s, _: prune_tokens(x, s, 0.5, False)),
         "merge": ("tokens after blocks[0] merge ratio=0.3 by=hidden protect=none restore=true",
                   lambda x, s, _: merge_tokens(x, s, 0.3, False))}


@pytest.mark.parametrize("step", sorted(RULES))
@pytest.mark.parametrize("with_calib", [False, True])
def test_a_token_step_on_ids_alone_equals_a_direct_run_at_every_length(step, with_calib):
    """The all-ones mask put the example's length into the graph as a bare symbol: the compiled
    model raised NameError on every call, and with calibration compile died in new_ones."""
    model = _IdsOnly().eval()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    rule, op = RULES[step]
    cm = slimfx.compile(model, rule, example_inputs={"input_ids": ids}, calib=[{"input_ids": ids}] if with_calib else None)
    for length in (10, 7, 13):
        batch = torch.randint(0, 50, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            got = cm(batch)
            for row in range(2):
                embedded = model.embed(batch[row:row + 1]) + model.position[:length]
                want = _run_blocks(model.blocks, embedded, {0: op}, qk=None)
                torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-4)
