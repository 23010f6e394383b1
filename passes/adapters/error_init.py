"""`adapt <linears> lora rank=R init=error`: adapters that start by undoing the error a `quantize`
left in each weight (EoRA, Liu et al. 2024; the idea of INT2.1), with no training.

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
from typing import Callable

import torch
from torch import fx

from ...dsl.errors import SpecError
from ...runtime.adapters import Adapter
from ..bind import BoundRule
from ..calibrate import HessianAccumulator
from ..context import Context
from ..graph import ModelGraph
from ..lora import BaseSite, base_sites, base_weight
from ..stream import Stream
from ..threads import one_thread
from .storage import store_as

__all__ = ["ErrorFit", "ErrorFigures", "InputMoment", "error_adapter", "fit_error_adapters", "error_tensors",
           "error_details", "error_note"]

# The ridge added to H before its Cholesky factor, as a fraction of H's mean eigenvalue: directions
# the calibration never excites get a finite L⁻¹ (M is free there; the ridge keeps it small), and
# the fit elsewhere moves by well under 1e-6 of the error. Raised tenfold while the factor fails.
_RIDGE = 1e-8
_NOISE = 1e-5


@dataclass(frozen=True)
class ErrorFit:
    """A and B of one adapter ([r, in] and [out, r], in the dtype they are stored in), and the
    output error E‖·x‖² of the encoded weight before and after the adapter as stored (the report
    prints their ratio)."""

    A: torch.Tensor
    B: torch.Tensor
    before: float
    after: float


@dataclass(frozen=True)
class ErrorFigures:
    """A fit's output errors without its A and B: what the report needs of each target once the
    adapter's stored tensors exist (holding every fit's float32 A and B until the last target
    was fitted cost twice the fp16 adapters: 37 MiB on SmolLM2 at rank 32)."""

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
            n = self.H.shape[0]
            ridge = _RIDGE * max(float(self.H.diagonal().mean()), torch.finfo(torch.float64).tiny)
            for _ in range(8):
                L, info = torch.linalg.cholesky_ex(self.H + ridge * torch.eye(n, dtype=torch.float64))
                if int(info) == 0:
                    break
                ridge *= 10
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
    # Through float32 first, as every adapter is computed before store_as rounds it (storage.py).
    A, B = store_as({"lora_A": A.float().contiguous(), "lora_B": (B / scale).float().contiguous()}, dtype).values()
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


# ---- in the adapter pass ---------------------------------------------------------------------

def fit_error_adapters(graph: ModelGraph, bound: BoundRule, ctx: Context, adapters: dict[str, Adapter],
                       dtype: torch.dtype, put: Callable[[str, dict[str, torch.Tensor]], None]
                       ) -> dict[str, ErrorFigures]:
    """Every target's adapter tensors (error_tensors), made along one calibration sweep of the
    graph (passes/stream.py) one input at a time and handed to `put`, which inserts them: the
    sweep stops at each distinct input in graph order, its H is accumulated, the adapters of the
    targets reading it (q/k/v share one) are fitted and put into the graph, and H is dropped
    before the stream goes on. So each fit sees the quantized model with the adapters before it
    (measured on SmolLM2 int2 g64 with r32 adapters, a prototype outside the pass: perplexity
    ×3.03 of fp32 against ×3.32 when every fit saw the model without adapters), and one H is held
    at a time (one run of every input at once held every H: ≈0.8 GiB in float64 on SmolLM2, 121
    inputs). Takes the targets' weights out of `ctx.originals`; returns each fit's errors."""
    _require(bound, ctx, list(adapters))
    originals = {path: ctx.originals.pop(path) for path in adapters}
    readers: dict[fx.Node, list[str]] = {}  # input -> the targets reading it, in rule order
    for path in adapters:
        readers.setdefault(base_sites(graph, graph.targets[path])[0].x, []).append(path)
    out = {}
    stream = Stream(graph, ctx.calib)
    with ctx.progress.task(f"fitting `init=error` adapters input by input (line {bound.line})",
                           total=len(adapters)) as step:
        for paths in [readers[x] for x in sorted(readers, key=graph.node_order.__getitem__)]:
            # Sites afresh: an adapter put on the linear whose output this input is (a linear
            # feeding a linear) moves the readers onto the adapter's sum.
            sites = {path: base_sites(graph, graph.targets[path])[0] for path in paths}
            x = sites[paths[0]].x
            acc = HessianAccumulator()
            stream.run_through(x, {x: [acc.add]})
            moment = InputMoment(acc.H)
            del acc
            fitted = {}
            for path in paths:
                fitted[path], out[path] = error_tensors(graph, sites[path], adapters[path], originals.pop(path),
                                                         moment, dtype)
                step(note=path)
            for path in paths:  # after every reader's fit: each saw the input without the others' adapters
                put(path, fitted[path])
    return out


def _require(bound: BoundRule, ctx: Context, paths: list[str]) -> None:
    """Every target encoded by an earlier precision rule, and calibration inputs; else a SpecError."""
    rule = bound.rule
    missing = [p for p in paths if p not in ctx.originals]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SpecError.at("illegal-order", f"`init=error` starts from the error a `quantize` left in each weight, "
                           f"and no precision rule before line {bound.line} encoded {shown}", line=bound.line,
                           column=rule.span.column, width=len("adapt"), source=ctx.source, filename=ctx.filename,
                           hint="quantize these linears above this rule, or narrow the selector to linears a "
                                "`quantize` covers")
    if not ctx.calib:
        raise SpecError.at("missing-value", "`init=error` weighs the quantization error by the inputs each linear "
                           "sees, and no calibration inputs were given", line=bound.line, column=rule.span.column,
                           width=len("adapt"), source=ctx.source, filename=ctx.filename,
                           hint="pass compile(..., calib=[batch, ...]) or calib=[text, ...], or use init=kaiming")


def error_tensors(graph: ModelGraph, site: BaseSite, adapter: Adapter, w: torch.Tensor, H: InputMoment,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], ErrorFigures]:
    """The adapter's tensors from the error of the target's base weight as encoded now, A and B
    stored in `dtype` (the fit in float64, then rounded once), and the fit's errors; `after` is
    the error left by the rounded adapter, the one the model computes with."""
    w_hat = base_weight(graph, site)
    with one_thread():
        fit = error_adapter(w, w_hat, H, adapter.rank, adapter.scale, dtype)
    tensors = {"lora_A": fit.A, "lora_B": fit.B}
    if adapter.method == "dora":  # m = ‖ŵ + s·B·A‖ per row: the magnitude of the weight it starts as
        tensors["lora_magnitude"] = torch.linalg.norm(w_hat + adapter.scale * fit.B.float() @ fit.A.float(), dim=1)
    return tensors, ErrorFigures(fit.before, fit.after)


def _left(fits: dict[str, ErrorFigures]) -> float:
    """Mean over targets of the output error left after the adapter, as a fraction of before."""
    ratios = [f.after / f.before if f.before > 0 else 1.0 for f in fits.values()]
    return sum(ratios) / len(ratios)


def error_details(fits: dict[str, ErrorFigures]) -> dict:
    return {"init": "error", "output_error_left": _left(fits)}


def error_note(fits: dict[str, ErrorFigures]) -> str:
    return (f"init=error: the adapters leave {_left(fits):.1%} of the quantization's output error on the "
            f"calibration inputs (mean over {len(fits)} targets)")
