"""The token rules' report prints one forward's latency as after/before, like every other rule's
report (collapse's `×now/was`): a slowdown must read as ×>1, never as a speed-up."""
from __future__ import annotations

import itertools

import pytest

import slimfx
from slimfx.models import tiny
from slimfx.passes.tokens import apply, unpad


@pytest.mark.parametrize("policy", ["tokens unpad", "tokens after blocks[0] prune keep=0.5"])
def test_a_slower_forward_reads_as_a_slowdown(monkeypatch, policy):
    # before 2 ms, after 4 ms: twice as slow, ×2.00 (the inverted ratio printed ×0.50)
    times = itertools.cycle([2.0, 4.0])
    for module in (apply, unpad):
        monkeypatch.setattr(module, "forward_ms", lambda graph, inputs: next(times))
    rule = slimfx.compile(tiny("llama", layers=2), policy).report.rules[-1]
    (note,) = [n for n in rule.notes if "one forward" in n]
    assert "one forward 2.0 → 4.0 ms (×2.00, best of 5)" in note
    assert rule.details["latency_ms_before"] == 2.0 and rule.details["latency_ms_after"] == 4.0


@pytest.mark.parametrize("policy", ["tokens unpad", "tokens after blocks[0] merge ratio=0.5",
                                    "tokens after blocks[0] prune keep=0.5"])
def test_a_calibration_batch_with_a_key_the_graph_takes_no_input_for_is_measured_on_its_inputs(policy):
    """Such keys ride along in calibration (GPTQ takes them); the report's latency called the
    graph with the whole batch, and a raw TypeError ("unexpected ['token_type_ids']") ended compile."""
    import torch

    lm = tiny("bert")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    rule = slimfx.compile(lm, policy, calib=[batch]).report.rules[-1]
    assert rule.details["latency_ms_before"] > 0
