"""`adapt <linears> lora rank=R init=error`: adapters that start by undoing the error a `quantize`
left in each weight (EoRA, Liu et al. 2024; the idea of INT2.1), with no training.

For a target with weight W before the precision rule, its encoded Ŵ and H = E[x xᵀ] of the inputs
it sees in the compressed model, the rank-r M that minimises the output error E‖(W − Ŵ − M) x‖²
is found in H's eigenbasis:

    H = Q Λ Qᵀ,   (W − Ŵ) Q Λ^½ ≈ U_r S_r V_rᵀ   (truncated SVD),   M = U_r S_r V_rᵀ Λ^-½ Qᵀ

which is Eckart–Young applied to (W − Ŵ − M) H^½. The adapter adds s·B·A x with s = α/r, so
B·A = M / s. Each rank-one term is split so that its column of B and its row of A have the same
norm (both train at one scale); a term the error does not need (a singular value at float32's
rounding noise, when the rank exceeds the error's) gets a row of A of the mean norm and a zero
column of B, as a fresh LoRA starts, so it can still learn.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx

from ...dsl.errors import SpecError
from ...runtime.adapters import Adapter
from ..bind import BoundRule
from ..calibrate import HessianAccumulator, output_error
from ..context import Context
from ..graph import ModelGraph
from ..lora import BaseSite, base_sites, base_weight
from ..stream import Stream
from ..threads import one_thread
from .storage import store_as

__all__ = ["ErrorFit", "InputBasis", "error_adapter", "fit_error_adapters", "error_tensors", "error_details",
           "error_note"]

# H's eigenvalues are floored at this fraction of their mean: directions the calibration never
# excites get a finite Λ^-½ (M is free there; the floor keeps it small), and the fit elsewhere
# moves by well under 1e-6 of the error.
_FLOOR = 1e-8
_NOISE = 1e-5


@dataclass(frozen=True)
class ErrorFit:
    """A and B of one adapter ([r, in] and [out, r], float32), and the output error E‖·x‖² of
    the encoded weight before and after the adapter (the report prints their ratio)."""

    A: torch.Tensor
    B: torch.Tensor
    before: float
    after: float


@dataclass(frozen=True)
class InputBasis:
    """H = Q Λ Qᵀ of one input's second moment, Λ floored (module doc); shared by every target
    reading that input (q/k/v, gate/up), so each input is decomposed once."""

    H: torch.Tensor
    Q: torch.Tensor
    lam: torch.Tensor

    @classmethod
    def of(cls, H: torch.Tensor) -> "InputBasis":
        H = H.double()
        lam, Q = torch.linalg.eigh((H + H.T) / 2)
        return cls(H, Q, lam.clamp(min=_FLOOR * max(float(lam.mean()), torch.finfo(torch.float64).tiny)))


def error_adapter(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor | InputBasis, rank: int,
                  scale: float) -> ErrorFit:
    """The adapter (A, B) with scale·B·A ≈ w − w_hat in the H-weighted norm. w, w_hat [out, in];
    H [in, in] (float64 preferred), or its `InputBasis`."""
    basis = H if isinstance(H, InputBasis) else InputBasis.of(H)
    H, Q, lam = basis.H, basis.Q, basis.lam
    if w.shape != w_hat.shape or H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"shapes do not fit: w {tuple(w.shape)}, ŵ {tuple(w_hat.shape)}, H {tuple(H.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank={rank}: a correction of a {tuple(w.shape)} weight has rank 1 to {min(w.shape)}")
    d = w.double() - w_hat.double()
    U, S, Vh = torch.linalg.svd(d @ (Q * lam.sqrt()), full_matrices=False)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    a = Vh @ (Q * lam.rsqrt()).T  # [r, in]: row i of A before the split
    b = U * S  # [out, r]
    a_norm, b_norm = a.norm(dim=1), b.norm(dim=0)
    # Terms below float32's rounding of the weights (W − Ŵ of float32 tensors has noise of ~1e-7
    # relative) carry no error worth fitting: they start as a fresh LoRA's instead.
    live = S > S.max().clamp(min=torch.finfo(torch.float64).tiny) * _NOISE
    t = torch.where(live, (b_norm / a_norm).sqrt(), torch.zeros_like(S))
    A, B = a * t[:, None], b / torch.where(live, t, torch.ones_like(t))
    if not bool(live.all()):  # the error has lower rank than the adapter: fresh-LoRA rows
        norm = A[live].norm(dim=1).mean() if bool(live.any()) else torch.tensor(w.shape[1] ** -0.5,
                                                                                 dtype=torch.float64)
        A[~live] = a[~live] / a_norm[~live, None] * norm
        B[:, ~live] = 0
    before = output_error(w, w_hat, H)
    after = output_error(w, w_hat.double() + B @ A, H)
    return ErrorFit(A.float(), (B / scale).float(), before, after)


# ---- in the adapter pass ---------------------------------------------------------------------

def fit_error_adapters(graph: ModelGraph, bound: BoundRule, ctx: Context, adapters: dict[str, Adapter],
                       dtype: torch.dtype) -> dict[str, tuple[dict[str, torch.Tensor], ErrorFit]]:
    """Every target's adapter tensors and fit (error_tensors), made along one calibration sweep of
    the graph as it is now (quantized, no adapter inserted yet; passes/stream.py), one block at a
    time: the block's input Hs are accumulated, each decomposed once (q/k/v share one input), the
    block's adapters fitted, and the Hs dropped before the stream goes on. One run of every input
    at once held every H (≈0.8 GiB in float64 on SmolLM2, 121 inputs); this holds one block's.
    Takes the targets' weights out of `ctx.originals`."""
    _require(bound, ctx, list(adapters))
    originals = {path: ctx.originals.pop(path) for path in adapters}
    sites = {path: base_sites(graph, graph.targets[path])[0] for path in adapters}
    readers: dict[fx.Node, list[str]] = {}  # input -> the targets reading it, in rule order
    for path, site in sites.items():
        readers.setdefault(site.x, []).append(path)
    out = {}
    stream = Stream(graph, ctx.calib)
    with ctx.progress.task(f"fitting `init=error` adapters block by block (line {bound.line})",
                           total=len(adapters)) as step:
        for chunk in _chunks(graph, readers):
            accs = {x: HessianAccumulator() for x in chunk}
            stream.run_through(chunk[-1], {x: [acc.add] for x, acc in accs.items()})
            for x in chunk:
                with one_thread():
                    basis = InputBasis.of(accs.pop(x).H)
                for path in readers[x]:
                    out[path] = error_tensors(graph, sites[path], adapters[path], originals.pop(path), basis, dtype)
                    step(note=path)
    return out


def _chunks(graph: ModelGraph, readers: dict[fx.Node, list[str]]) -> list[list[fx.Node]]:
    """The inputs in graph order, cut where the block of their first reader changes: each chunk
    is one block's inputs (or a run of inputs outside the blocks), and comes after the one before."""
    chunks: list[list[fx.Node]] = []
    last = object()
    for x in sorted(readers, key=graph.node_order.__getitem__):
        block = graph.targets[readers[x][0]].block
        if block != last:
            chunks.append([])
        chunks[-1].append(x)
        last = block
    return chunks


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


def error_tensors(graph: ModelGraph, site: BaseSite, adapter: Adapter, w: torch.Tensor, H: InputBasis,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], ErrorFit]:
    """The adapter's tensors from the error of the target's base weight as encoded now, A and B
    stored in `dtype` (the fit in float64, then rounded once); the fit's `after` is the error left
    by the rounded adapter, the one the model computes with."""
    w_hat = base_weight(graph, site)
    with one_thread():
        fit = error_adapter(w, w_hat, H, adapter.rank, adapter.scale)
        tensors = store_as({"lora_A": fit.A, "lora_B": fit.B}, dtype)
        A, B = tensors["lora_A"].float(), tensors["lora_B"].float()
        if dtype != torch.float32:
            fit = replace(fit, after=output_error(w, w_hat.double() + adapter.scale * B.double() @ A.double(), H.H))
    if adapter.method == "dora":  # m = ‖ŵ + s·B·A‖ per row: the magnitude of the weight it starts as
        tensors["lora_magnitude"] = torch.linalg.norm(w_hat + adapter.scale * B @ A, dim=1)
    return tensors, fit


def _left(fits: dict[str, ErrorFit]) -> float:
    """Mean over targets of the output error left after the adapter, as a fraction of before."""
    ratios = [f.after / f.before if f.before > 0 else 1.0 for f in fits.values()]
    return sum(ratios) / len(ratios)


def error_details(fits: dict[str, ErrorFit]) -> dict:
    return {"init": "error", "output_error_left": _left(fits)}


def error_note(fits: dict[str, ErrorFit]) -> str:
    return (f"init=error: the adapters leave {_left(fits):.1%} of the quantization's output error on the "
            f"calibration inputs (mean over {len(fits)} targets)")
