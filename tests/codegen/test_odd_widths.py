"""Row and GEMM-epilogue kernels on row widths that are not powers of two (BLOCK > D: the masked
tail of every row must not reach a reduction), and op arguments the random graphs never draw
(add/sub alpha, a cube, a layer norm's own eps) — lowered and compared with torch itself."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from slimfx.codegen.lower import lower_graph


def _lowered(model: nn.Module, *xs: torch.Tensor) -> tuple[fx.GraphModule, object]:
    n = torch.export.Dim("n")
    dims = tuple({0: n} for _ in xs)
    gm = torch.export.export(model.eval(), xs, dynamic_shapes=dims).module()
    new, summary = lower_graph(gm.graph)
    return fx.GraphModule(gm, new), summary


def _check(model: nn.Module, shape, *, others=1, template="rows", atol=1e-5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*shape, generator=gen) for _ in range(others)]
    lowered, summary = _lowered(model, *xs)
    assert dict(summary.by_template).get(template, 0) >= 1 and summary.eager == (), summary
    for rows in (shape[0], shape[0] + 4):  # another number of rows too (the shapes are symbolic)
        run = [torch.randn(rows, *shape[1:], generator=gen) * 3 + 1 for _ in range(others)]
        with torch.no_grad():
            got, want = lowered(*run), model(*run)
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, -1) * 2.0


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.w = nn.Parameter(torch.randn(d, generator=gen), requires_grad=False)
        self.b = nn.Parameter(torch.randn(d, generator=gen), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.w, self.b, eps=self.eps) + 1.0


class RMSNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class MaxShift(nn.Module):
    def forward(self, x):  # all-negative rows: a masked tail read as 0 would win the max
        y = -(x * x) - 1.0
        return y - y.amax(-1, keepdim=True)


@pytest.mark.parametrize("d", [5, 37, 100])
@pytest.mark.parametrize("model", [Softmax, RMSNorm, MaxShift], ids=lambda m: m.__name__)
def test_row_reductions_on_widths_that_are_not_powers_of_two(model, d):
    _check(model(), (3, d))


@pytest.mark.parametrize("d", [5, 37])
def test_layer_norm_on_odd_widths_with_its_own_eps(d):
    # eps = 0.5 against rows of variance ~9: a kernel that used the default 1e-5 is ~3% off
    _check(LayerNorm(d, 0.5), (7, d))
    _check(LayerNorm(d, 1e-5), (7, d))


class Alpha(nn.Module):
    def forward(self, x, y):
        return torch.add(x, y, alpha=2.5) * torch.sub(x, y, alpha=0.5)


class Cube(nn.Module):
    def forward(self, x):
        return torch.tanh(x.pow(3) * 0.1) + x


def test_add_and_sub_keep_their_alpha():
    _check(Alpha(), (3, 11), others=2, template="rows")


def test_a_cube_is_a_cube():
    _check(Cube(), (3, 11))


class LinearAlpha(nn.Module):
    """A GEMM whose epilogue adds a residual with alpha and cubes (both in the epilogue)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(13, 13)

    def forward(self, x):
        return torch.add(self.lin(x).pow(3), x, alpha=-1.5)


def test_a_gemm_epilogue_keeps_alpha_and_the_cube():
    torch.manual_seed(0)
    _check(LinearAlpha(), (3, 13), template="gemm", atol=1e-4)
