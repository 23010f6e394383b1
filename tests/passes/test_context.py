"""passes/context.py: ctx.calib notes whether a rule read it, and the report says what the
model was calibrated on — or nothing, when no rule calibrated (a --calib that went unused)."""
from __future__ import annotations

import torch
from passes_tiny import example_inputs, tiny_model, token_batches

import slimfx
from slimfx.passes.context import CalibrationBatches, Context


def test_only_reading_a_batch_counts_as_calibrating():
    batches = token_batches(n=2)
    calib = Context(calib=batches).calib
    assert isinstance(calib, CalibrationBatches) and len(calib) == 2 and calib and not calib.read
    assert calib[0] is batches[0] and calib.read
    for use in (lambda c: list(c), lambda c: c + [], lambda c: [b for b in c]):
        fresh = CalibrationBatches(batches)
        use(fresh)
        assert fresh.read


def test_described_counts_real_tokens_and_rows():
    masked = {"input_ids": torch.ones(2, 6, dtype=torch.long),
              "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    bare = {"input_ids": torch.ones(3, 5, dtype=torch.long)}
    assert CalibrationBatches([masked, bare]).described() == "25 tokens in 5 rows"
    assert CalibrationBatches([{"pixel_values": torch.zeros(4, 3, 8, 8)}] * 2).described() == "8 rows in 2 batches"
    one = {"input_ids": torch.ones(1, 1, dtype=torch.long)}  # it said "1 tokens in 1 rows"
    assert CalibrationBatches([one]).described() == "1 token in 1 row"
    assert CalibrationBatches([{"pixel_values": torch.zeros(1, 3, 8, 8)}]).described() == "1 row in 1 batch"


def test_the_report_says_what_a_calibrating_rule_ran_on_and_nothing_otherwise():
    model, batches = tiny_model("llama"), token_batches(n=2, rows=2, length=12)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in batches)
    gptq = slimfx.compile(model, "quantize blocks.*.mlp.* : Linear int4 method=gptq",
                          example_inputs=example_inputs("llama"), calib=batches)
    assert gptq.report.calibration == f"{tokens} tokens in 4 rows"
    assert f"calibrated on {tokens} tokens in 4 rows" in str(gptq.report)
    rtn = slimfx.compile(model, "quantize blocks.*.mlp.* : Linear int4",
                         example_inputs=example_inputs("llama"), calib=batches)
    assert rtn.report.calibration == "" and "calibrated" not in str(rtn.report)


def test_measuring_on_a_batch_is_not_calibrating():
    """Unpad's report figures read a calibration batch: the caption said `calibrated on 3,072
    tokens` and compile never noted an unused --calib. (A drop with a heal after it does run the
    calibration batches: it records what left the removed blocks, for the heal; without one it
    reads none.)"""
    model, batches = tiny_model("llama"), token_batches(n=2, rows=2, length=12)
    for policy in ("tokens unpad", "drop blocks[1]"):
        cm = slimfx.compile(model, policy, example_inputs=example_inputs("llama"), calib=batches)
        assert cm.report.calibration == ""
    cm = slimfx.compile(model, "drop blocks[1]\nheal method=linear", example_inputs=example_inputs("llama"),
                        calib=batches)
    assert cm.report.calibration == "48 tokens in 4 rows"
