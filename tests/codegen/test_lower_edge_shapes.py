"""Graphs whose shapes the templates once read wrongly, lowered and compared with eager: a [R]
value against [R, R] rows (torch broadcasts it as a column), a LayerNorm over two dims, and a
Python inf in a pointwise op; a [D] weight against a reduced [B, S] row (S == D); a GEMM epilogue
behind GPT-2's flattening view; tanh near 0; a softmax of a 0-d tensor. Each was a silent wrong
answer, a raw error at the first call or while partitioning, or a lost precision."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphs import lowered_matches_eager
from slimfx.codegen.lower import lower_graph


class PairwiseDistances(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 32)

    def forward(self, x):  # x [N, 8] -> [N, N]
        h = self.proj(x)
        sq = (h * h).sum(-1)
        return sq[:, None] + sq - 2.0 * (h @ h.T)


def test_a_vector_shaped_like_the_rows_broadcasts_along_them_as_torch_does():
    torch.manual_seed(0)
    summary = lowered_matches_eager(PairwiseDistances(), torch.randn(6, 8), torch.randn(9, 8))
    assert any("broadcasts it along the last dim" in why for why, _ in summary.eager)


class TwoDimNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(16, 64), nn.LayerNorm([4, 16])

    def forward(self, x):  # x [B, 4, 16]
        return self.norm(self.proj(x).view(-1, 4, 4, 16).sum(1)) * 2.0


class ScalarSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("t", torch.tensor(2.0))

    def forward(self, x):
        return x * torch.softmax(self.t, -1)  # legal in torch: 1.0


def test_a_softmax_of_a_0d_tensor_is_no_row_reduction():
    """Partitioning took it for one and divided by its rank, 0 (ZeroDivisionError in compile,
    --stats and --emit-kernels)."""
    lowered_matches_eager(ScalarSoftmax(), torch.randn(2, 5), torch.randn(3, 5))


def test_a_layer_norm_over_two_dims_is_not_fused_as_a_row_norm():
    torch.manual_seed(0)
    with torch.no_grad():
        model = TwoDimNorm()
        model.norm.weight.uniform_(0.5, 1.5), model.norm.bias.uniform_(-1, 1)
    lowered_matches_eager(model, torch.randn(2, 4, 16), torch.randn(3, 4, 16))


class InfLiteral(nn.Module):
    def forward(self, x):
        return (torch.relu(x) + 1.0) * float("inf") - torch.relu(-x) * float("-inf")


def test_an_infinite_python_number_is_written_as_one():
    x = torch.randn(3, 16)
    x[0, 0] = 0.0  # relu(-0) * -inf is nan in torch: the kernel must agree
    ep = torch.export.export(InfLiteral().eval(), (x,), dynamic_shapes=({0: torch.export.Dim("n")},))
    gm = ep.module()
    new, summary = lower_graph(gm.graph)
    assert summary.eager == (), "the group has a template: it runs as a kernel"
    with torch.no_grad():
        torch.testing.assert_close(fx.GraphModule(gm, new)(x), gm(x), equal_nan=True)


class SequenceWeighted(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):  # x [B, 4, 4]: a [B, 4] sum times w [4] lines w up with the sequence
        return torch.exp(x).sum(-1) * self.w


def test_a_column_meeting_a_reduced_row_lines_up_with_the_rows_as_torch_does():
    torch.manual_seed(0)
    summary = lowered_matches_eager(SequenceWeighted(), torch.randn(2, 4, 4), torch.randn(1, 4, 4))
    assert any("lines it up with the rows" in why for why, _ in summary.eager)


class Conv1DThen(nn.Module):
    """GPT-2's Conv1D — addmm on the [B·S, K] rows, viewed back as [B, S, N] — then `act`."""

    def __init__(self, act):
        super().__init__()
        self.w, self.b, self.act = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(8)), act

    def forward(self, x):
        h = torch.addmm(self.b, x.view(-1, x.size(-1)), self.w)
        return self.act(h.view(x.size()[:-1] + (8,)))


@pytest.mark.parametrize("act", ["relu", "gelu", "softmax"])
def test_a_gemm_epilogue_behind_a_flattening_view_is_lowered_or_left_eager(act):
    """The view's [B, S, N] shape names B and S, which no input of the GEMM's group holds apart
    (it reads the [B·S, K] rows): the group lowered, then every call raised Unsupported."""
    fn = {"relu": torch.relu, "gelu": F.gelu, "softmax": lambda h: torch.softmax(h * 2.0, -1)}[act]
    torch.manual_seed(0)
    model = Conv1DThen(fn).eval()
    x = torch.randn(2, 3, 16)
    dims = {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}
    gm = torch.export.export(model, (x,), dynamic_shapes=(dims,)).module()
    new, summary = lower_graph(gm.graph)
    lowered = fx.GraphModule(gm, new)
    assert dict(summary.by_template)["gemm"] == 1
    with torch.no_grad():
        for inp in (x, torch.randn(1, 1, 16), torch.randn(3, 5, 16)):
            torch.testing.assert_close(lowered(inp), model(inp), atol=1e-5, rtol=1e-5)


class Tanh(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 2.0


def test_tanh_keeps_its_relative_precision_near_zero():
    """tanh as 2·sigmoid(2x) - 1 cancels near 0: tanh(1e-4) was 1.7e-4 off, relatively."""
    x = torch.cat([torch.logspace(-8, 1, 40), -torch.logspace(-8, 1, 40), torch.linspace(-3, 3, 41)]).reshape(1, -1)
    ep = torch.export.export(Tanh().eval(), (x,))
    new, summary = lower_graph(ep.module().graph)
    assert summary.eager == ()
    with torch.no_grad():
        got = fx.GraphModule(ep.module(), new)(x)
    torch.testing.assert_close(got, torch.tanh(x) * 2.0, atol=0, rtol=1e-6)


class LinearByVector(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, x):  # [M, 8] · [8] -> [M]
        return F.linear(x, self.w) * 2.0


def test_a_linear_by_a_1d_weight_is_no_gemm():
    """Taken for a GEMM, its template read the weight's column stride: a raw IndexError at the
    first call."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    gm = torch.export.export(LinearByVector().eval(), (x,)).module()
    new, summary = lower_graph(gm.graph)
    assert "gemm" not in dict(summary.by_template)
    with torch.no_grad():
        torch.testing.assert_close(fx.GraphModule(gm, new)(x), gm(x), atol=1e-5, rtol=1e-5)
