"""`plan` refuses what the model alone decides, as compile does (it said "ready", and compile
refused at the rule only once every rule above it had run): a LoRA heal's lm loss or a `by
fisher` budget on a model without logits or token ids, a fold with no pre-norm block before the
cut, `tokens unpad` on a model captured without an attention mask."""
from __future__ import annotations

import pytest

import slimfx
from slimfx.models import tiny

CASES = [
    ("bert", "drop blocks[1]\nheal method=lora steps=1", 2,
     "`heal method=lora` cannot train here: loss='lm' needs a model whose output has logits"),
    ("vit", "drop blocks[1]\nheal method=lora steps=1", 2,
     "`heal method=lora` cannot train here: loss='lm' scores the token ids an embedding reads (or labels), and the "
     "model takes ['pixel_values']"),
    ("bert", "precision blocks.*.mlp.* choose {int8, int4} budget avg_bits<=6 by fisher", 1,
     "`by fisher` weighs each output by the gradient of a causal LM's next-token loss, and this model cannot give it"),
    ("llama", "drop blocks[0]\nheal method=linear fold=true", 2,
     "folds into the down projection of the block before each cut, and the gap starts at the first block"),
    ("bert", "drop blocks[1]\nheal method=linear fold=true", 2,
     "needs encoder.layer.0's output to be the residual sum h + down(…) (a pre-norm block)"),
    ("vit", "tokens unpad", 1, "`tokens unpad` finds the real tokens from the attention mask"),
]


@pytest.mark.parametrize("arch, policy, line, says", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_plan_refuses_what_the_model_decides_as_compile_does(arch, policy, line, says):
    lm = tiny(arch, layers=3)
    for run in (lambda: slimfx.plan(lm, policy), lambda: slimfx.compile(lm, policy, calib=[lm.example_inputs])):
        with pytest.raises(slimfx.SpecError) as e:
            run()
        assert e.value.diagnostics[0].kind == "unsupported" and e.value.line == line
        assert says in e.value.diagnostics[0].message


@pytest.mark.parametrize("arch, policy", [
    ("bert", "drop blocks[1]\nheal method=lora steps=1 distill=true"),  # distillation needs no logits
    ("llama", "drop blocks[1]\nheal method=lora steps=1"),
    ("llama", "drop blocks[1]\nheal method=linear fold=true"),
    ("gpt2", "precision blocks.*.mlp.* : Linear choose {int8, int4} budget avg_bits<=6 by fisher"),
    ("bert", "tokens unpad"),
])
def test_plan_still_passes_what_compile_takes(arch, policy):
    assert slimfx.plan(tiny(arch, layers=3), policy)
