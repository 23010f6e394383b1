"""Graphs whose shapes the templates once read wrongly, lowered and compared with eager: a [R]
value against [R, R] rows (torch broadcasts it as a column), a LayerNorm over two dims, and a
Python inf in a pointwise op. Each was a silent wrong answer or a raw error at the first call."""
from __future__ import annotations

import torch
from torch import fx, nn

from slimfx.codegen.lower import lower_graph


def _lowered_matches_eager(model: nn.Module, x: torch.Tensor, *others: torch.Tensor):
    ep = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("n")},))
    gm = ep.module()
    new, summary = lower_graph(gm.graph)
    lowered = fx.GraphModule(gm, new)
    with torch.no_grad():
        for inp in (x, *others):
            torch.testing.assert_close(lowered(inp), gm(inp), atol=1e-5, rtol=1e-5)
    return summary


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
    summary = _lowered_matches_eager(PairwiseDistances(), torch.randn(6, 8), torch.randn(9, 8))
    assert any("broadcasts it along the last dim" in why for why, _ in summary.eager)


class TwoDimNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(16, 64), nn.LayerNorm([4, 16])

    def forward(self, x):  # x [B, 4, 16]
        return self.norm(self.proj(x).view(-1, 4, 4, 16).sum(1)) * 2.0


def test_a_layer_norm_over_two_dims_is_not_fused_as_a_row_norm():
    torch.manual_seed(0)
    with torch.no_grad():
        model = TwoDimNorm()
        model.norm.weight.uniform_(0.5, 1.5), model.norm.bias.uniform_(-1, 1)
    _lowered_matches_eager(model, torch.randn(2, 4, 16), torch.randn(3, 4, 16))


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
