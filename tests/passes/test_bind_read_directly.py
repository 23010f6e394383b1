"""Weights the forward reads itself, not by calling their module (nn.MultiheadAttention's
in_proj_weight and out_proj, a mixture of experts' 3-D tensors): no rule can select them, and
`quantize blocks.*.**` left them unchanged without a word."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfx
from slimfx.dsl.errors import SpecError


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), {"src": torch.randn(2, 6, 32)}


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 16)
        self.experts = nn.Parameter(torch.randn(4, 16, 16))  # [expert, in, out], read by einsum

    def forward(self, x):
        return x + torch.einsum("bsi,eio->bso", self.up(x), self.experts) / 4


class _MoE(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_Experts() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _warnings(model, rule: str, example) -> tuple[str, ...]:
    (bound,) = slimfx.plan(model, rule, example_inputs=example).rules
    return bound.warnings


def test_a_rule_over_blocks_with_weights_read_directly_says_how_much_it_cannot_change():
    model, example = _encoder()
    (note,) = _warnings(model, "quantize blocks.*.** : Linear int8", example)
    direct = [(n, p) for n, p in model.named_parameters() if "self_attn" in n and p.dim() == 2]
    share = sum(p.numel() for _, p in direct) / sum(p.numel() for p in model.parameters())
    assert len(direct) == 4 and note.startswith(f"{share:.0%} of these blocks' weight bytes are read by the forward "
                                                "itself, not by a module call (layers.0.self_attn.in_proj_weight, ")
    assert note.endswith("and 2 more): no rule can change them")
    cm = slimfx.compile(model, "quantize blocks.*.** : Linear int8", example_inputs=example)
    assert note in cm.report.rules[0].notes


def test_three_d_expert_weights_are_named():
    (note,) = _warnings(_MoE(), "quantize blocks.*.** int4 group=16", {"x": torch.randn(2, 5, 16)})
    # the experts: 4·16·16 of each block's 4·16·16 + 16·16 + 16 weights
    assert note.startswith(f"{1024 / (1024 + 256 + 16):.0%} of these blocks' weight bytes") and \
        "(blocks.0.experts, blocks.1.experts)" in note


def test_a_rule_that_names_its_modules_or_blocks_without_such_weights_says_nothing_of_them():
    model = _MoE()
    assert _warnings(model, "quantize blocks.*.up int8", {"x": torch.randn(2, 5, 16)}) == ()  # it named what it wants
    assert _warnings(model, "quantize {blocks[1].**, blocks[0].up} int8", {"x": torch.randn(2, 5, 16)}) != ()
    from slimfx.models import tiny
    lm = tiny("llama")
    assert _warnings(lm.model, "quantize blocks.*.** : Linear int8", lm.example_inputs) == ()


def test_selecting_a_linear_whose_weight_is_read_directly_says_why_it_cannot_be():
    """It said "none of them is a linear …", of an nn.Linear."""
    model, example = _encoder()
    with pytest.raises(SpecError) as e:
        slimfx.plan(model, "quantize blocks.*.self_attn.out_proj int8", example_inputs=example)
    assert e.value.kind == "selector"
    assert e.value.message.startswith("`blocks.*.self_attn.out_proj` names `layers.0.self_attn.out_proj` (and 1 more "
                                      "like it), whose weight the forward reads itself")


def test_after_a_drop_the_blocks_left_are_read_as_well():
    """A rule below a removal binds to a view of the blocks left, which has no graph of its own."""
    model, example = _encoder()  # (nn.TransformerEncoder computes a value in its first block that the next reads)
    plan = slimfx.plan(model, "drop blocks[1]\nquantize blocks.*.** : Linear int8", example_inputs=example)
    assert any("(layers.0.self_attn.in_proj_weight, layers.0.self_attn.out_proj.weight)" in w
               for w in plan.rules[1].warnings)
    with pytest.raises(SpecError, match="names `layers.0.self_attn.out_proj`, whose weight the forward reads itself"):
        slimfx.plan(model, "drop blocks[1]\nquantize blocks.*.self_attn.out_proj int8", example_inputs=example)
