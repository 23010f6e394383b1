"""A real model, small enough for CI: SmolLM2-135M with every block linear in int8 per channel
(RTN) keeps its perplexity within 1% of fp32 on a short text."""
import pytest
import torch

import slimfx
from slimfx import evaluation as ev
from slimfx import models


@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_int8_perplexity_within_one_percent_of_fp32():
    lm = models.load("smollm2-135m")
    text = ev.default_text()
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][:, :8]
    cm = slimfx.compile(lm.model, "policy int8 {\n    quantize blocks.*.** : Linear int8\n}\n",
                        example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    rule = cm.report.rules[0]
    assert len(rule.targets) == 30 * 7 and rule.details["format"] == "int8 per-channel"
    # One window of 256 tokens, measured: fp32 11.455; int8 through the reference op
    # (slimfx::quant_linear) 11.497 (+0.37%); int8 as compiled by default (CPU int8pack kernel,
    # bf16 activations) 11.489 (+0.30%). A symmetric zero point off by one code in dequantize
    # gave 210.6 (+1739%).
    fp32 = ev.perplexity(lm.model, lm.tokenizer, text, window=256, max_tokens=256)
    assert 3 < fp32 < 100
    ratios = {"default": ev.perplexity(cm, lm.tokenizer, text, window=256, max_tokens=256) / fp32}
    if hasattr(cm, "set_backend"):
        cm.set_backend("eager")  # the format itself, without a kernel's activation rounding
        ratios["reference"] = ev.perplexity(cm, lm.tokenizer, text, window=256, max_tokens=256) / fp32
    print(f"SmolLM2-135M perplexity, 256 tokens: fp32 {fp32:.3f}; int8 / fp32 - 1: "
          + ", ".join(f"{k} {r - 1:+.2%}" for k, r in ratios.items()))
    assert all(abs(r - 1) < 0.01 for r in ratios.values()), ratios
