"""passes/lowrank.py's drift target (with and without the residual stream's drift), against a
least squares solved directly on the rows (torch.linalg.lstsq), and passes/calibrate.py's
paired_moment."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from slimfx.passes.calibrate import paired_moment
from slimfx.passes.lowrank import drift_target


def _rows(n, inp, gen):
    return torch.randn(n, inp, generator=gen, dtype=torch.float64) @ torch.randn(inp, inp, generator=gen,
                                                                                 dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 12), inp=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_without_ridge_the_target_is_the_least_squares_map_from_the_compressed_inputs(out, inp, seed):
    """W_t x ≈ W x_ref over the rows: with ridge 0, W_t = argmin ‖X W_tᵀ − X_ref Wᵀ‖ exactly."""
    gen = torch.Generator().manual_seed(seed)
    n = 4 * inp + 3
    x = _rows(n, inp, gen)
    x_ref = x + 0.3 * _rows(n, inp, gen)  # the original model's inputs at the same rows
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    H, C = x.T @ x / n, x_ref.T @ x / n
    want = torch.linalg.lstsq(x, x_ref @ w.T).solution.T
    torch.testing.assert_close(drift_target(w, H, C, ridge=0.0), want, atol=1e-8 * float(want.abs().max()) + 1e-10,
                               rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 12), inp=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_with_the_streams_drift_the_target_also_restores_the_residual_sum(out, inp, seed):
    """For a layer whose output is added to the residual stream r: with D = E[(r_ref − r) xᵀ] and
    ridge 0, W_t x ≈ W x_ref + (r_ref − r), the original model's sum less the compressed stream."""
    gen = torch.Generator().manual_seed(seed)
    n = 4 * inp + 3
    x = _rows(n, inp, gen)
    x_ref = x + 0.3 * _rows(n, inp, gen)
    e = 0.5 * torch.randn(n, out, generator=gen, dtype=torch.float64) + x @ torch.randn(
        inp, out, generator=gen, dtype=torch.float64)  # r_ref − r, partly a function of x
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    H, C, D = x.T @ x / n, x_ref.T @ x / n, e.T @ x / n
    want = torch.linalg.lstsq(x, x_ref @ w.T + e).solution.T
    torch.testing.assert_close(drift_target(w, H, C, ridge=0.0, D=D), want,
                               atol=1e-8 * float(want.abs().max()) + 1e-10, rtol=1e-6)


def test_the_ridge_shrinks_towards_the_weight_itself_and_no_drift_leaves_it():
    gen = torch.Generator().manual_seed(0)
    x = _rows(40, 6, gen)
    x_ref = x + 0.5 * _rows(40, 6, gen)
    w = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    H, C = x.T @ x / 40, x_ref.T @ x / 40
    torch.testing.assert_close(drift_target(w, H, H), w)  # x_ref = x: nothing to undo
    far = [float((drift_target(w, H, C, ridge=r) - w).norm()) for r in (0.0, 1.0, 10.0, 1e6)]
    assert far == sorted(far, reverse=True) and far[-1] < 1e-4 * far[0]


def test_paired_moment_pairs_each_batchs_rows_as_one_sum_over_every_row_does():
    gen = torch.Generator().manual_seed(1)
    lefts = [torch.randn(n, 4, generator=gen) for n in (5, 3, 7)]
    rights = [torch.randn(n, 6, generator=gen) for n in (5, 3, 7)]
    L, R = torch.cat(lefts).double(), torch.cat(rights).double()
    got = paired_moment(zip(lefts, rights))
    assert got.dtype == torch.float64 and got.shape == (4, 6)
    torch.testing.assert_close(got, L.T @ R / 15)
    with pytest.raises(ValueError, match="same tokens: 5 rows against 3"):
        paired_moment(zip(lefts, [rights[1], rights[0], rights[2]]))
    with pytest.raises(ValueError, match="at least one batch"):
        paired_moment([])
