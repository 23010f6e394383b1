"""GEMMs that read one input but depend on each other through an op outside both groups must not
be merged into one kernel (partition.py `_independent`); GEMMs in different weight formats are
not merged either (`_anchor_key`), and addmms reading one input are, as linears are (the key took
an addmm's bias for its input). A dequantize read by one GEMM is that GEMM's prologue."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfx.codegen.partition import partition

from graphs import QuantLinear, capture_module, lowered_matches_eager


class ThroughAnOpaqueOp(nn.Module):
    """l2's epilogue reads cumsum(l1(x)): cumsum is opaque (a kernel of its own), so l1 and l2 —
    both reading x — cannot be one kernel: it would have to run before and after cumsum."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(12, 12), nn.Linear(12, 12)

    def forward(self, x):
        return self.l2(x) + torch.cumsum(self.l1(x), -1)


def test_gemms_reading_one_input_through_an_unfused_op_are_not_merged():
    torch.manual_seed(0)
    gm = capture_module(ThroughAnOpaqueOp(), torch.randn(3, 12))
    gemms = [g for g in partition(gm) if g.kind == "gemm"]  # check_acyclic inside
    assert len(gemms) == 2 and all(len(g.anchors) == 1 for g in gemms)
    summary = lowered_matches_eager(ThroughAnOpaqueOp(), torch.randn(3, 12), torch.randn(5, 12))
    assert dict(summary.by_template)["gemm"] == 2


class TwoFormats(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = QuantLinear(32, 16, 4, 16, True, False, "none", seed=1)
        self.b = QuantLinear(32, 16, 4, 32, True, False, "none", seed=2)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_gemms_in_different_weight_formats_are_separate_groups():
    gm = capture_module(TwoFormats(), torch.randn(3, 32))
    gemms = [g for g in partition(gm) if g.kind == "gemm"]
    assert len(gemms) == 2 and all(len(g.anchors) == 1 for g in gemms)


def test_a_split_merged_gemm_keeps_the_product_with_the_anchor_of_its_width():
    """sigmoid(gate(x)) * up(x), gate 16 -> 1: the merged group is split (emit.py split_anchors);
    the product goes with `up` (the latest anchor it reads), reading sigmoid(gate) as a row
    operand, so nothing is left to eager ops. Given to `gate` (N = 1) it cannot be fused."""
    from test_lower_merged import ScalarGate

    torch.manual_seed(0)
    summary = lowered_matches_eager(ScalarGate(False), torch.randn(3, 16), torch.randn(5, 16))
    assert dict(summary.by_template)["gemm"] == 2 and summary.eager == ()


class TwoAddmms(nn.Module):
    """GPT-2's Conv1D form: addmm(bias, x, w). Two reading one x are one kernel, as two linears
    are; the key took the bias for the input, so they never were."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1, self.w2 = (nn.Parameter(torch.randn(12, n, generator=gen), requires_grad=False) for n in (8, 16))
        self.b1, self.b2 = (nn.Parameter(torch.randn(n, generator=gen), requires_grad=False) for n in (8, 16))

    def forward(self, x):
        return torch.addmm(self.b1, x, self.w1).relu(), torch.addmm(self.b2, x, self.w2) * 2.0


def test_addmms_reading_one_input_are_merged_like_linears():
    gm = capture_module(TwoAddmms(), torch.randn(3, 12))
    gemms = [g for g in partition(gm) if g.kind == "gemm"]
    assert len(gemms) == 1 and len(gemms[0].anchors) == 2
    summary = lowered_matches_eager(TwoAddmms(), torch.randn(3, 12), torch.randn(5, 12))
    assert dict(summary.by_template)["gemm"] == 1 and summary.eager == ()


class OneDequantize(nn.Module):
    """linear(x, dequantize(…)) with the dequantized weight read once: the prologue of its GEMM."""

    def __init__(self, bits: int, group, sym: bool):
        super().__init__()
        self.q = QuantLinear(24, 16, bits, group, sym, False, "none")

    def forward(self, x):
        w = torch.ops.slimfx.dequantize(self.q.qweight, self.q.scales, self.q.zeros, *self.q.args)
        return torch.relu(torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("bits, group, sym", [(4, 8, False), (8, None, True), (2, 8, False)])
def test_a_dequantize_read_by_one_gemm_is_its_prologue(bits, group, sym):
    """The dequantize came first in graph order and was grouped alone, so its GEMM read a whole
    float weight an eager op had written (the fused prologue was dead code)."""
    gm = capture_module(OneDequantize(bits, group, sym), torch.randn(3, 24))
    assert [(g.kind, [str(n.target) for n in g.nodes]) for g in partition(gm)] == [
        ("gemm", ["slimfx.dequantize.default", "aten.linear.default", "aten.relu.default"])]
    summary = lowered_matches_eager(OneDequantize(bits, group, sym), torch.randn(3, 24), torch.randn(6, 24))
    assert dict(summary.by_template) == {"gemm": 1} and summary.eager == ()
