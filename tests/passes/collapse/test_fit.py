"""The least-squares map of `heal method=linear` (passes/collapse/fit.py) against numpy-free
direct solutions written here."""
from __future__ import annotations

import torch

from slimfx.passes.collapse.fit import fit_map


def test_an_exactly_linear_run_is_recovered():
    """λ = 0 and no row weighting: the plain least-squares solution, which finds A when Y = X·A."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen) / 4
    xs = [torch.randn(40, 16, generator=gen) for _ in range(3)]
    fit = fit_map(xs, [x @ a for x in xs], ridge=0.0, weighted=False)
    assert torch.allclose(fit.map, a, atol=1e-5)
    assert fit.residual_after < 1e-6 < fit.residual_before


def test_weighted_ridge_matches_the_closed_form():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(8, 8, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(200, 8, generator=gen,
                                                                                           dtype=torch.float64)
    y[:5] *= 100  # a few huge rows: the weighting keeps them from dominating
    w = 1 / y.norm(dim=1, keepdim=True)
    gram = x.T @ (w * x)
    lam = 0.01 * torch.trace(gram) / 8
    t = torch.eye(8, dtype=torch.float64) + torch.linalg.solve(gram + lam * torch.eye(8, dtype=torch.float64),
                                                               x.T @ (w * (y - x)))
    fit = fit_map([x[:100].float(), x[100:].float()], [y[:100].float(), y[100:].float()])
    assert torch.allclose(fit.map.double(), t, atol=1e-4)
    # The report's fit residuals: ‖X − Y‖ / ‖Y‖ before the map, ‖X·T − Y‖ / ‖Y‖ after it.
    assert abs(fit.residual_before - float((x - y).norm() / y.norm())) < 1e-6
    assert abs(fit.residual_after - float((x.float().double() @ fit.map.double() - y).norm() / y.norm())) < 1e-5


def test_the_fit_stays_on_its_activations_device():
    """On a GPU the activations are there; "meta" as the default device stands in for that here:
    a sum begun on the default device would refuse the CPU rows."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(20, 6, generator=g) for _ in range(2)]
    ys = [x @ torch.randn(6, 6, generator=g) for x in xs]
    for weighted in (True, False):
        want = fit_map(xs, ys, weighted=weighted)
        with torch.device("meta"):  # the default device inside
            got = fit_map(xs, ys, weighted=weighted)
        assert got.map.device.type == "cpu"
        torch.testing.assert_close(got.map, want.map)
