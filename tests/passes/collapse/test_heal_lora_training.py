"""What `heal method=lora` trains and says: only its own adapters take gradients (an earlier
compile's keep none), the ranks it reports are the ranks it used, and a bidirectional model is
refused the next-token loss at the rule, by plan as by compile."""
from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx import SpecError
from slimfx.models import tiny


def test_adapters_of_an_earlier_compile_take_no_gradient_from_the_heal():
    """They were made trainable with the heal's own: each ended the heal holding the sum of its
    steps' gradients, and a user's loop then stepped with it."""
    lm = tiny("llama", layers=4)
    cm1 = slimfx.compile(lm, "adapt blocks.*.attn.q lora rank=4 alpha=8")
    before = {n: p.detach().clone() for n, p in cm1.named_parameters() if "q_proj.lora_" in n}
    cm2 = slimfx.compile(cm1, "drop blocks[2]\nheal method=lora steps=3 lr=0.01 merge=false",
                         calib=[lm.example_inputs])
    inherited = {n: p for n, p in cm2.named_parameters() if "q_proj.lora_" in n}
    assert len(inherited) == 6 and len(cm2.adapter_parameters()) > 6  # blocks 0, 1, 3; and the heal's
    assert all(p.grad is None for p in cm2.parameters())
    assert all(p.requires_grad for p in cm2.adapter_parameters())  # all trainable again afterwards
    assert all(torch.equal(p, before[n]) for n, p in inherited.items())


def test_the_report_gives_the_ranks_the_adapters_have():
    """rank=500 on linears of 32 and 64 features: "LoRA r=500" was reported for adapters of 32 and 64."""
    lm = tiny("llama", layers=4)
    cm = slimfx.compile(lm, "drop blocks[2]\nheal method=lora steps=1 rank=500 merge=false", calib=[lm.example_inputs])
    row = cm.report.rules[-1]
    ranks = sorted({a.rank for a in cm.adapters.values()})
    assert len(ranks) > 1 and row.details["rank"] == ranks[-1]
    assert f"LoRA r={ranks[0]}–{ranks[-1]} (rank=500 capped at the linears' sizes)" in row.notes[0]
    small = slimfx.compile(lm, "drop blocks[2]\nheal method=lora steps=1 rank=2 merge=false", calib=[lm.example_inputs])
    assert small.report.rules[-1].notes[0].startswith("LoRA r=2 on ") and small.report.rules[-1].details["rank"] == 2


def _masked_lm():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32)).eval()


def test_a_lora_heal_of_a_masked_lm_needs_distill_by_plan_and_by_compile():
    """Its default loss is next-token cross entropy, which a masked LM lowers by copying the token
    it sees: compile trained on it and merged the result."""
    model = _masked_lm()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    policy = "drop blocks[2]\nheal method=lora steps=2"
    for run in (lambda p: slimfx.plan(model, p, example_inputs=ex),
                lambda p: slimfx.compile(model, p, example_inputs=ex, calib=[ex])):
        with pytest.raises(SpecError) as e:
            run(policy)
        (d,) = e.value.diagnostics
        assert d.line == 2 and "is not causal" in d.message and "distill=true" in d.hint
    healed = slimfx.compile(model, policy + " distill=true", example_inputs=ex, calib=[ex])
    assert "distill loss" in healed.report.rules[-1].notes[0]


@pytest.mark.parametrize("policy, says", [
    ("tokens unpad\ndrop blocks[1]\nheal method=lora steps=1", "the `tokens` rule on line 1 above it"),
    ("drop blocks[1]\ntokens unpad\nheal method=lora steps=1", "the `tokens` rule on line 2 above it"),
])
def test_a_lora_heal_after_a_token_rule_is_refused_at_its_line(policy, says):
    """The token ops have no gradients: compile failed mid-heal with autograd's raw RuntimeError."""
    lm = tiny("llama", layers=4)
    for run in (lambda: slimfx.plan(lm, policy), lambda: slimfx.compile(lm, policy)):
        with pytest.raises(SpecError) as e:
            run()
        (d,) = e.value.diagnostics
        assert d.line == 3 and says in d.message and "no gradients" in d.message


def test_a_lora_heal_or_fisher_budget_on_an_earlier_compiles_token_ops_is_refused():
    lm = tiny("llama", layers=4)
    unpadded = slimfx.compile(lm, "tokens unpad")
    for rule in ("drop blocks[1]\nheal method=lora steps=1",
                 "precision blocks.*.mlp.down choose {int8, int4} budget avg_bits<=6 by fisher"):
        with pytest.raises(SpecError, match=r"an earlier compile's token rules put ops there that have no gradients"):
            slimfx.compile(unpadded, rule)


def test_a_model_whose_mask_the_causal_probe_cannot_make_plans_a_lora_heal():
    """A 4-D mask of the model's own: the probe filled a 2-D one and died on the graph's guard."""
    from torch import nn

    lm = tiny("llama", layers=4)

    class Wrapped(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None].expand(2, 1, 6, 6).clone()
    plan = slimfx.plan(Wrapped(lm.model).eval(), "drop blocks[1]\nheal method=lora steps=1",
                       example_inputs={"input_ids": torch.randint(3, 250, (2, 6)), "attention_mask": mask})
    assert len(plan.rules) == 2
