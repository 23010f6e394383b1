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
