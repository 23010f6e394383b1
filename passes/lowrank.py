"""The low-rank correction of a quantization error that `adapt … init=error` starts each adapter
from (EoRA, Liu et al. 2024; the idea of INT2.1): the fit alone, shared by the adapter pass and
the precision pass, which fits them during its sequential sweep when the adapt rule follows it
(`ErrorPlan`).

For a target with weight W before the precision rule, its encoded Ŵ, D = W − Ŵ and H = E[x xᵀ] of
the inputs it sees in the compressed model, the rank-r M minimising the output error
E‖(D − M) x‖² = ‖(D − M) R‖²_F, for any root R Rᵀ = H, is (Eckart–Young on D R) the projection of
D onto the top r left singular vectors U_r of D R: M = U_r U_rᵀ D. They are found from the smaller
of two Gram matrices, never decomposing H itself (an eigendecomposition of the 1536-wide H of
SmolLM2's down projections peaked at 54–81 MiB, more than the rest of the sweep):

- out ≤ in: U_r are the top eigenvectors of D H Dᵀ [out, out] (no root needed); term i is
  u_i ⊗ u_iᵀD.
- out > in: with L the Cholesky factor of H (+ a ridge of 1e-8 of its mean eigenvalue, so
  directions the calibration never excites stay finite), V_r the top eigenvectors of (DL)ᵀDL
  [in, in]: term i is DL v_i ⊗ v_iᵀ L⁻¹ (= u_i s_i ⊗ s_i⁻¹ u_iᵀ D).

The adapter adds s·B·A x with s = α/r, so B·A = M / s. Each rank-one term is split so that its
column of B and its row of A have the same norm (both train at one scale); a term the error does
not need (a singular value at float32's rounding noise, when the rank exceeds the error's) gets a
zero column of B and a row of A of the mean norm in a fixed random direction, as a fresh LoRA
starts, so it can still learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.adapters import STORED_DTYPES
from .calibrate import damped

__all__ = ["ErrorFit", "ErrorPlan", "InputMoment", "error_adapter", "drift_target", "DRIFT_RIDGE"]

# The ridge added to H before its Cholesky factor, as a fraction of H's mean eigenvalue: directions
# the calibration never excites get a finite L⁻¹ (M is free there; the ridge keeps it small), and
# the fit elsewhere moves by well under 1e-6 of the error. Raised tenfold while the factor fails.
_RIDGE = 1e-8
_NOISE = 1e-5
# drift_target's ridge, as a fraction of H's mean eigenvalue; it shrinks the drift's regression
# towards none (W itself). Measured on SmolLM2-135M int2 g64 zero=float clip=output + r32 fp16
# adapters, a prototype without refit, GPTQ's and the adapter's ridge apart (perplexity; fp32
# 28.79, no drift term 80.0):
#   the adapter's target only: ridge 0.01: 99.5 (the regression overfits 3,072 calibration rows),
#   0.1: 77.0, 0.3: 74.2, 1: 69.2, 3: 65.3, 10: 72.6
#   both (adapter, GPTQ): (1, 1): 64.5, (3, 3): 62.8, (10, 10): 60.0, (10, 3): 60.9, (3, 10): 63.4,
#   (30, 10): 67.4, (3, 30): 68.1, (10, 100): 68.0
# Rerun on 2026-12-02 with the committed code, the (10, 10) loop gives 62.8, equal to the pass;
# the 60.0 above came from the prototype's code of that hour, not kept. Neighbouring settings
# move int2 perplexity by ±5%, so the table ranks the ridges only roughly. The residual stream's
# drift term (`D`) shares the ridge: 1: 61.9, 3: 66.8, 10: 60.5, 30: 60.6.
DRIFT_RIDGE = 10.0


@dataclass(frozen=True)
class ErrorPlan:
    """What a later `adapt … init=error` (at `line`) will fit for one target: the precision rule
    just before it fits the same adapter during its sweep (passes/precision/sequential.py), so
    the blocks after see the corrected weights."""

    rank: int
    alpha: float
    dtype: str  # a key of STORED_DTYPES
    line: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORED_DTYPES[self.dtype]


@dataclass(frozen=True)
class ErrorFit:
    """A and B of one adapter ([r, in] and [out, r], in the dtype they are stored in), and the
    output error E‖·x‖² of the encoded weight before and after the adapter as stored (the report
    prints their ratio)."""

    A: torch.Tensor
    B: torch.Tensor
    before: float
    after: float


class InputMoment:
    """H = E[x xᵀ] of one input (float64), shared by every target reading it (q/k/v, gate/up); its
    Cholesky factor is made at the first target that needs it (one wider in than out) and kept for
    the others."""

    def __init__(self, H: torch.Tensor):
        self.H = H.double()
        self._root: torch.Tensor | None = None

    def root(self) -> torch.Tensor:
        """L, lower triangular, with L Lᵀ = H + ridge·I (module doc)."""
        if self._root is None:
            for tries in range(8):
                L, info = torch.linalg.cholesky_ex(damped(self.H, _RIDGE * 10 ** tries))
                if int(info) == 0:
                    break
            else:
                raise ValueError("the calibration inputs' second moment is not positive semi-definite "
                                 "(a NaN or inf among the calibration activations?)")
            self._root = L
        return self._root


def error_adapter(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor | InputMoment, rank: int,
                  scale: float, dtype: torch.dtype = torch.float32) -> ErrorFit:
    """The adapter (A, B) with scale·B·A ≈ w − w_hat in the H-weighted norm, fitted in float64 and
    rounded once to `dtype`; `after` is the error the rounded adapter leaves. w, w_hat [out, in];
    H [in, in] (float64 preferred), or its `InputMoment`."""
    moment = H if isinstance(H, InputMoment) else InputMoment(H)
    H = moment.H
    if w.shape != w_hat.shape or H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"shapes do not fit: w {tuple(w.shape)}, ŵ {tuple(w_hat.shape)}, H {tuple(H.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank={rank}: a correction of a {tuple(w.shape)} weight has rank 1 to {min(w.shape)}")
    d = w.double() - w_hat.double()
    b, S, a = _top_terms(d, moment, rank)  # M = b @ a, term i singular value S[i]
    a_norm, b_norm = a.norm(dim=1), b.norm(dim=0)
    # Terms below float32's rounding of the weights (W − Ŵ of float32 tensors has noise of ~1e-7
    # relative) carry no error worth fitting: they start as a fresh LoRA's instead.
    live = S > S.max().clamp(min=torch.finfo(torch.float64).tiny) * _NOISE
    t = torch.where(live, (b_norm / a_norm.clamp(min=torch.finfo(torch.float64).tiny)).sqrt(), torch.zeros_like(S))
    A, B = a * t[:, None], b / torch.where(live, t, torch.ones_like(t))
    if not bool(live.all()):  # the error has lower rank than the adapter: fresh-LoRA rows
        norm = A[live].norm(dim=1).mean() if bool(live.any()) else torch.tensor(w.shape[1] ** -0.5,
                                                                                 dtype=torch.float64)
        fresh = torch.randn(int((~live).sum()), w.shape[1], generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
        A[~live] = fresh / fresh.norm(dim=1, keepdim=True) * norm
        B[:, ~live] = 0
    before = float((d @ H * d).sum())
    # Row-major like every parameter (solve_triangular and the flips give other strides; a saved
    # and reloaded adapter is row-major, and must compute bit for bit as the compiled one).
    # Through float32 first, as every adapter is computed before it is rounded to its stored dtype
    # (passes/adapters/storage.py).
    A, B = A.float().contiguous().to(dtype), (B / scale).float().contiguous().to(dtype)
    return ErrorFit(A, B, before, _left_error(d, scale * B.double(), A.double(), H, before))


def _top_terms(d: torch.Tensor, moment: InputMoment, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b [out, r], S [r], a [r, in]): the best rank-r correction of d in H's norm as b @ a, term by
    term, and the singular values of d·H^½ they hold — from the smaller Gram matrix (module doc)."""
    out, inp = d.shape
    if out <= inp:
        G = d @ moment.H @ d.T
        lam, U = torch.linalg.eigh((G + G.T) / 2)
        U, lam = U[:, -rank:].flip(1), lam[-rank:].flip(0)
        return U, lam.clamp(min=0).sqrt(), U.T @ d
    L = moment.root()
    dL = d @ L
    lam, V = torch.linalg.eigh(dL.T @ dL)
    V, lam = V[:, -rank:].flip(1), lam[-rank:].flip(0)
    a = torch.linalg.solve_triangular(L, V.T, upper=False, left=False)  # Vᵀ L⁻¹
    return dL @ V, lam.clamp(min=0).sqrt(), a


def _left_error(d: torch.Tensor, B: torch.Tensor, A: torch.Tensor, H: torch.Tensor, before: float) -> float:
    """tr((d − BA) H (d − BA)ᵀ) from r-wide products only (no second d-sized matrix):
    before − 2·tr(B A H dᵀ) + tr(B A H Aᵀ Bᵀ)."""
    AH = A @ H
    cross = float(((AH @ d.T) * B.T).sum())
    return max(before - 2 * cross + float(((AH @ A.T) * (B.T @ B)).sum()), 0.0)


def drift_target(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, ridge: float = DRIFT_RIDGE,
                 D: torch.Tensor | None = None) -> torch.Tensor:
    """The weight whose outputs on the compressed model's inputs x best match (in the mean square,
    ridge-regularised) the original layer's outputs W x_ref on the original model's inputs at the
    same rows, H = E[x xᵀ], C = E[x_ref xᵀ]: W_t = W (I + (C − H)(H + ridge·h̄·I)⁻¹), h̄ H's mean
    eigenvalue (float64 [out, in]). With ridge 0, W_t = W C H⁻¹, the least-squares map from x to
    W x_ref; an error adapter fitted to W_t − Ŵ rather than W − Ŵ also undoes the drift the
    compressed layers before left in this layer's input (as GPTAQ, Li et al. 2025, does for
    GPTQ's target). The ridge shrinks the drift's correction to none, not the weight to zero.

    `D` = E[e xᵀ] [out, in], for a layer whose output is added to the residual stream
    (passes/residual.py): e = r_ref − r, the stream's drift there (the original model's value
    minus the compressed one's). The target is then W x_ref + e, what the sum would have been in
    the original model: W_t = W + (W (C − H) + D)(H + ridge·h̄·I)⁻¹."""
    Hd = H.double()
    wd = w.double()
    # W C − W H rather than W (C − H): [out, in] temporaries, not another [in, in] (18 MiB for a
    # 1536-wide input); every sum below in place for the same reason
    shift = wd @ C.double()
    shift.sub_(wd @ Hd)
    if D is not None:
        shift.add_(D.double())
    R = damped(Hd, ridge)
    L, info = torch.linalg.cholesky_ex(R)
    if int(info) == 0:  # R = L Lᵀ (positive definite whenever the ridge or the rows make it so)
        del R
        return wd + torch.cholesky_solve(shift.T, L).T
    # X R = shift, R symmetric: X = (R⁻¹ shiftᵀ)ᵀ
    return wd + torch.linalg.solve(R, shift.T).T
