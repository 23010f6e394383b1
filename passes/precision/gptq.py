"""GPTQ (Frantar et al., 2022) on one weight matrix, and the calibration statistics it needs.

The precision pass records each target Linear's inputs into a `HessianAccumulator`, then calls
`gptq(w, acc.H, fmt)` (or `runtime.formats.quantize_rtn`) and scores formats with `output_error`.
Pure functions of tensors: nothing here knows about graphs.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ...runtime.formats import (NotFinite, QuantFormat, QuantizedWeight, dequantize_codes, group_params, group_size,
                               pack, quantize_codes, store_zeros)
from ..calibrate import HessianAccumulator, damped, output_error  # calibration statistics are core: the adapter pass reads them too
from .clip import column_weights, searched_params
from .refit import ROUNDS, fitted_params, row_errors, stored_params

__all__ = ["HessianAccumulator", "hessian", "gptq", "output_error"]


def hessian(xs: Iterable[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """H = E[x xᵀ] (float64 [in, in], see HessianAccumulator) over all rows of all batches, and the row count."""
    acc = HessianAccumulator()
    for x in xs:
        acc.add(x)
    return acc.H, acc.count


# ---- GPTQ ------------------------------------------------------------------------------------

def _inverse_cholesky(H: torch.Tensor, damp: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor U of (H' + damp·mean(diag H')·I)⁻¹ = Uᵀ U, in float32, H' = H with
    rows and columns in the order `perm` (if given): row i of U holds the error-propagation
    coefficients of column i onto the columns after it."""
    # One [in, in] float64 matrix at a time beside H where it can be (each is 19 MiB for a
    # 1536-wide input, and this is at the top of compile's peak in the `init=error` sweep): the
    # damped copy (calibrate.damped), then each factor dropped once the next is made.
    ridged = damped(H, damp, perm)
    L, info = torch.linalg.cholesky_ex(ridged)
    del ridged
    if int(info) != 0:
        raise ValueError(f"the calibration Hessian is not positive definite even with damp={damp}; "
                         "increase damp or calibrate on more (or more varied) rows")
    inverse = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(inverse, upper=True).float()


def _prepare(w: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copy of w and H in float64, with dead inputs (never active in calibration) zeroed
    in w and given a unit diagonal in a copy of H so the factorization exists. Nothing here or
    after writes into H."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D floating-point weight, got {w.dtype} {tuple(w.shape)}")
    if H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"H is {tuple(H.shape)} but the weight has {w.shape[1]} inputs; "
                         "accumulate H from this Linear's inputs")
    if not bool(torch.isfinite(w).all()):
        raise NotFinite("its weight holds NaN or inf; fix the model's weights before quantizing")
    if not bool(torch.isfinite(H).all()):
        raise NotFinite("its inputs on the calibration batches hold NaN or inf (the model computes them there)")
    w, H = w.detach().float().clone(), H.detach().double()
    dead = H.diagonal() == 0
    if bool(dead.any()):  # H is copied only then: it is the caller's (shared by q/k/v), 19 MiB at 1536 wide
        H = H.clone()
        H[dead, dead] = 1
        w[:, dead] = 0
    return w, H


def _block_columns(block_size: int, group: int, static: bool) -> int:
    """Block width. Without static groups a group's scale comes from its columns as updated so
    far, so a group must sit inside one block: blocks are rounded to whole groups."""
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be positive")
    return block_size if static else max(1, block_size // group) * group


def gptq(w: torch.Tensor, H: torch.Tensor, fmt: QuantFormat, *, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False, clip: str = "none", refit: bool = False) -> QuantizedWeight:
    """Quantize w [out, in] column by column, folding each column's rounding error into the columns
    not yet quantized (weighted by the inverse Hessian) so the layer output moves least.

    Scales: per-channel formats take them from the whole weight up front. Group formats take a
    group's scale from its columns as updated when the group starts (GPTQ's default, the ragged
    last group included). With `act_order` and groups, scales are fixed up front from the
    original weight's contiguous groups ("static groups"), so the packed layout stays the plain
    contiguous one and needs no per-column group index. `clip` searches each group's range as it
    is set (passes/precision/clip.py). `refit` then solves for the scales (and float zero points)
    that fit the chosen codes best, alternating with GPTQ on the fitted grid
    (passes/precision/refit.py).
    """
    if not damp >= 0:  # also refuses NaN
        raise ValueError(f"damp={damp} must be non-negative (a fraction of the mean Hessian diagonal)")
    w, H = _prepare(w, H)
    out, cols = w.shape
    g = group_size(fmt, cols)
    fit = _group_fitter(fmt, clip, H)
    n = -(-cols // g)
    scales = torch.zeros(out, n, device=w.device)
    zeros = None if fmt.sym else torch.zeros(out, n, device=w.device)
    static = act_order or g == cols  # per-channel (or one group) needs no re-fit along the way
    if static:
        for k in range(n):
            fit(w[:, k * g:(k + 1) * g], k * g, k, scales, zeros)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    order = _ColumnOrder(perm, H, damp, g)
    codes = order.codes(w, fmt, scales, zeros, _block_columns(block_size, g, static), None if static else g, fit,
                        in_place=not refit)
    if refit:
        codes, scales, zeros = _refitted(w, H, codes, scales, zeros, fmt, damp, order, block_size)
    return QuantizedWeight(pack(codes, fmt.bits), scales.half(), store_zeros(zeros, fmt), fmt, (out, cols))


class _ColumnOrder:
    """The order GPTQ takes the columns in (act_order's permutation, or as they are) and the
    inverse-Hessian factor of that order, kept so a refit can run GPTQ again on another grid."""

    def __init__(self, perm: torch.Tensor | None, H: torch.Tensor, damp: float, g: int):
        self.perm = perm
        cols = H.shape[0]
        self.U = _inverse_cholesky(H, damp, perm)
        self.group_of = (perm if perm is not None else torch.arange(cols, device=H.device)) // g

    def codes(self, w, fmt, scales, zeros, block, dynamic_group, fit, in_place: bool = False) -> torch.Tensor:
        """uint8 codes [out, in] of w in the original column order. GPTQ updates the columns as it
        goes: in a permuted copy, else in w itself with `in_place` (a copy saved where w is not
        needed again)."""
        w = w[:, self.perm] if self.perm is not None else w if in_place else w.clone()
        codes = _quantize_blocks(w, self.U, fmt, self.group_of, scales, zeros, block, dynamic_group, fit)
        return codes if self.perm is None else codes[:, torch.argsort(self.perm)]


def _refitted(w, H, codes, scales, zeros, fmt, damp, order: _ColumnOrder, block_size: int):
    """(codes, scales, zeros) after `ROUNDS` refits (refit.py): each row keeps whichever tried
    codes and parameters, rounded as stored, leave it the least error — its first ones when none
    do better."""
    best = row_errors(w, codes, scales, zeros, fmt, H)
    tried = codes
    for r in range(ROUNDS):
        if r:  # GPTQ again, on the grid each row holds now
            tried = order.codes(w, fmt, scales, zeros, block_size, None, None)
        s, z = stored_params(*fitted_params(w, tried, scales, zeros, fmt, H, damp), fmt)
        err = row_errors(w, tried, s, z, fmt, H)
        better = (err < best) & torch.isfinite(err)
        best = torch.where(better, err, best)
        codes = torch.where(better[:, None], tried, codes)
        scales = torch.where(better[:, None], s, scales)
        if zeros is not None:
            zeros = torch.where(better[:, None], z, zeros)
    return codes, scales, zeros


def _group_fitter(fmt: QuantFormat, clip: str, H: torch.Tensor):
    """fit(wg, first column, k, scales, zeros): set group k's scale (and zero point) from its
    columns `wg` [out, <= group] starting at `first` — their full range, or the searched one.
    A float zero point comes back already rounded to fp16 (`group_params`), so the columns after
    are quantized, and their errors propagated, on the grid that is stored."""
    weights = column_weights(clip, H)

    def fit(wg, first, k, scales, zeros) -> None:
        if clip == "none":
            s, z = group_params(wg, fmt)
        else:
            s, z = searched_params(wg, fmt, None if weights is None else weights[first:first + wg.shape[1]])
        scales[:, k] = s
        if zeros is not None:
            zeros[:, k] = z

    return fit


def _quantize_blocks(w, U, fmt, group_of, scales, zeros, block, dynamic_group, fit) -> torch.Tensor:
    """The blocked GPTQ loop over (possibly permuted) columns; returns uint8 codes [out, in] in
    that column order. `dynamic_group` is the group size when scales are set as groups start."""
    out, cols = w.shape
    codes = torch.zeros(out, cols, dtype=torch.uint8, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        wb = w[:, i1:i2].clone()
        err = torch.zeros_like(wb)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic_group is not None and j % dynamic_group == 0:
                # Blocks hold whole groups, so wb has every update this group has seen.
                fit(wb[:, i:i + dynamic_group], j, j // dynamic_group, scales, zeros)
            k = int(group_of[j])
            s, z = scales[:, k], None if zeros is None else zeros[:, k]
            codes[:, j] = quantize_codes(wb[:, i], s, z, fmt)
            e = (wb[:, i] - dequantize_codes(codes[:, j], s, z, fmt)) / U[j, j]
            wb[:, i:] -= e.unsqueeze(1) * U[j, i1 + i:i2].unsqueeze(0)
            err[:, i] = e
        # Lazy batch update: the columns after this block see its errors in one matmul.
        w[:, i2:] -= err @ U[i1:i2, i2:]
    return codes
