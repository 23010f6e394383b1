"""The least-squares map of `heal method=linear`: T such that X·T ≈ Y, pulled toward identity.

    T = I + (XᵀWX + λ·tr(XᵀWX)/d·I)⁻¹ XᵀW(Y − X)

X: the residual stream entering a cut (rows of calibration tokens), Y: what left the removed run
in the model before it was cut, W: each token's row weighted by 1/‖Y_t‖ (a few tokens carry
streams orders of magnitude larger than the rest and would decide the fit alone). Measured on
SmolLM2 with 4 blocks dropped (perplexity × fp32 on 1024 eval tokens): weight 1/‖Y‖ ×1.200,
1/‖Y‖² ×1.224, none ×1.295, at λ = 0.01; λ = 0.001 or 0.1 was worse with 1/‖Y‖. Solved in
float64. With λ = 0 and no weighting it is the plain least-squares solution (XᵀX)⁻¹XᵀY.
Measured with a standalone prototype on SmolLM2 (DESIGN.md): the weighting and λ = 0.01 matter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Fit", "fit_map", "RIDGE"]

RIDGE = 0.01


@dataclass(frozen=True)
class Fit:
    map: torch.Tensor  # T [d, d], float32: apply as h @ T
    residual_before: float  # ‖X − Y‖ / ‖Y‖ over the calibration rows (no map: the plain cut)
    residual_after: float  # ‖X·T − Y‖ / ‖Y‖


def fit_map(xs: list[torch.Tensor], ys: list[torch.Tensor], *, ridge: float = RIDGE, weighted: bool = True) -> Fit:
    """T from batches of rows `xs[i]` → `ys[i]` (each [tokens, d], the same tokens)."""
    if not xs or len(xs) != len(ys):
        raise ValueError(f"fit_map needs matching batches of rows, got {len(xs)} and {len(ys)}")
    d, device = xs[0].shape[-1], xs[0].device  # the model's device (a GPU's, for one there)
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    cross = torch.zeros(d, d, dtype=torch.float64, device=device)
    for x, y in zip(xs, ys):
        x, y = x.double(), y.double()
        w = _weights(y, weighted)
        gram += (x * w).T @ x
        cross += (x * w).T @ (y - x)
    damp = ridge * torch.trace(gram) / d
    eye = torch.eye(d, dtype=torch.float64, device=device)
    update = torch.linalg.solve(gram + damp * eye, cross)
    t = eye + update
    before = _relative(xs, ys, None)
    after = _relative(xs, ys, t)
    return Fit(t.float(), before, after)


def _weights(y: torch.Tensor, weighted: bool) -> torch.Tensor:
    if not weighted:
        return y.new_ones(y.shape[0], 1)
    return 1.0 / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _relative(xs, ys, t: torch.Tensor | None) -> float:
    err = norm = 0.0
    for x, y in zip(xs, ys):
        x, y = x.double(), y.double()
        pred = x if t is None else x @ t
        err += (pred - y).pow(2).sum().item()
        norm += y.pow(2).sum().item()
    return (err / max(norm, 1e-30)) ** 0.5
