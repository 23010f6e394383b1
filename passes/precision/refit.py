"""`refit=true`: each group's scale (and float offset) solved for, once the codes are chosen.

A group's range is set before its codes (from its weights' range or a clipping search), and GPTQ
then moves the later columns' weights to absorb earlier rounding: once every code is fixed, the
scale and offset that set the range are no longer the ones that put the dequantized weight
closest to the original. With the codes q fixed, a row's dequantized weight is linear in its
groups' parameters — ŵ_j = s_g·(q_j − z_g) for a whole zero point or the middle code (z fixed),
ŵ_j = s_g·q_j + c_g for a float zero point (c_g = −s_g·z_g) — so the parameters minimising the
calibration-weighted error (w − ŵ)ᵀ H (w − ŵ) of the row solve one small linear system: G or 2G
unknowns for G groups. Rows are independent (the error is a sum over rows).

Refitting alternates with GPTQ (`ROUNDS`): fitted parameters, then GPTQ's codes on that fixed grid,
then parameters fitted to those codes. A row keeps the parameters of least error among those
tried (its first ones included), after rounding them as stored (fp16 scales and float zero
points), so the refit is never worse than none on the measure it minimises. Measured on SmolLM2
block 3, int2 g64 zero=float clip=output act_order: the output error of q/o/up/down falls to
0.89/0.92/0.90/0.92 of GPTQ's after 2 refits, 0.86/0.91/0.89/0.91 after 4, 0.85/0.91/0.88/0.91
after 8 (at twice the time of 4); the whole model's perplexity 250.5 (GPTQ) → 136.7 (2) → 112.6 (4).
"""
from __future__ import annotations

import torch

from ..calibrate import damped
from ...runtime.formats import FLOAT_ZERO_MAX, QuantFormat, dequantize_groups, group_size, per_column

__all__ = ["ROUNDS", "fitted_params", "stored_params", "row_errors"]

ROUNDS = 4  # refits; each after the first re-runs GPTQ on the fitted grid (module doc)
# Rows of the weight solved at once: the products for one row span [groups, in] float64 (36 KiB
# per group at in=1536), so 32 rows of a down projection hold 9 MiB.
_ROWS = 32
# Pull towards the current parameters, relative to each unknown's curvature: a direction the codes
# leave undetermined (a group whose codes are all equal has its scale and offset on one line) stays
# where it was instead of running off along it.
_HOLD = 1e-6


def fitted_params(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  fmt: QuantFormat, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales [out, n] and zero points [out, n] (float32; zeros None when symmetric, unchanged
    when whole) minimising Σ_rows (w − ŵ)ᵀ (H + damp·mean diag·I) (w − ŵ) for these codes [out, in],
    unrounded. `scales`/`zeros` are the current ones (the solve's anchor)."""
    out, cols = w.shape
    g = group_size(fmt, cols)
    n = scales.shape[1]
    pad = n * g - cols
    Hd = torch.nn.functional.pad(damped(H, damp), (0, pad, 0, pad)).view(n, g, n * g)  # padding weighs nothing
    float_zero = fmt.zero == "float" and zeros is not None
    basis = codes.double() - _fixed_zero(zeros, fmt, float_zero, g, cols)
    P = torch.nn.functional.pad(basis, (0, pad))  # the scale's basis
    W = torch.nn.functional.pad(w.double(), (0, pad))
    theta0 = scales.double() if not float_zero else torch.cat([scales.double(), -(scales * zeros).double()], 1)
    theta = torch.empty_like(theta0)
    if float_zero:
        CC = Hd.view(n, g, n, g).sum((1, 3))  # offsets' Gram block: the same for every row
        Cw = (W @ Hd.view(n * g, n * g)).view(out, n, g).sum(-1)
    for r0 in range(0, out, _ROWS):
        X = P[r0:r0 + _ROWS].view(-1, n, g)
        rows = X.shape[0]
        Y = torch.einsum("rgi,gij->rgj", X, Hd)  # [rows, n, n·g]: each group's basis through H
        SS = torch.einsum("rghj,rhj->rgh", Y.view(rows, n, n, g), X)
        Sw = torch.einsum("rgj,rj->rg", Y, W[r0:r0 + rows])
        if float_zero:
            SC = Y.view(rows, n, n, g).sum(-1)
            M = torch.cat([torch.cat([SS, SC], 2), torch.cat([SC.transpose(1, 2), CC.expand(rows, n, n)], 2)], 1)
            b = torch.cat([Sw, Cw[r0:r0 + rows]], 1)
        else:
            M, b = SS, Sw
        hold = _HOLD * M.diagonal(dim1=1, dim2=2).clamp(min=torch.finfo(torch.float64).tiny)
        M = M + torch.diag_embed(hold)
        theta[r0:r0 + rows] = torch.linalg.solve(M, (b + hold * theta0[r0:r0 + rows]).unsqueeze(-1)).squeeze(-1)
    if not float_zero:
        return theta.float(), zeros
    s, c = theta[:, :n], theta[:, n:]
    return s.float(), (-c / torch.where(s != 0, s, 1.0)).float()


def stored_params(scales: torch.Tensor, zeros: torch.Tensor | None, fmt: QuantFormat
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fitted parameters as they would be stored: scales rounded to fp16, float zero points too.
    What cannot be stored (a scale not positive in fp16, a float zero point beyond ±2048, which
    fp16 no longer holds within half a code) becomes NaN, so the row's error is NaN and the row
    keeps what it had."""
    s = scales.half().float()
    s = torch.where((s > 0) & torch.isfinite(s), s, torch.nan)
    if zeros is None or fmt.zero != "float":
        return s, zeros
    return s, torch.where(zeros.abs() <= FLOAT_ZERO_MAX, zeros.half().float(), torch.nan)


def row_errors(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               fmt: QuantFormat, H: torch.Tensor) -> torch.Tensor:
    """(w − ŵ)ᵀ H (w − ŵ) of each row [out] (float64), ŵ dequantized from these parameters."""
    d = w.double() - dequantize_groups(codes, scales, zeros, fmt).double()
    return ((d @ H.double()) * d).sum(1)


def _fixed_zero(zeros: torch.Tensor | None, fmt: QuantFormat, float_zero: bool, g: int,
                cols: int) -> torch.Tensor | float:
    """What the codes are measured from in the scale's basis: the whole zero point (per column),
    the middle code when symmetric, 0 with a float offset (which then has a basis of its own)."""
    if float_zero:
        return 0.0
    if zeros is None:
        return float(1 << (fmt.bits - 1))
    return per_column(zeros, g, cols)
