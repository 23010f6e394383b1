"""`adapt <linears> lora rank=R init=error`: adapters that start by undoing the error a `quantize`
left in each weight (EoRA, Liu et al. 2024; the idea of INT2.1), with no training. The fit itself
(the H-weighted best rank-r correction of W − Ŵ) is passes/lowrank.py.

Where the adapt rule directly follows a sequential GPTQ rule encoding its targets, that rule has
already fitted each adapter during its sweep, on the same inputs its GPTQ saw (`ctx.error_fits`):
so every later layer was calibrated on the layers before it as they will compute, adapters
included (passes/precision/compensate.py, with the figures). The others are fitted here, along
one calibration sweep of the compressed model (`fit_error_adapters`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import fx

from ...dsl.errors import SpecError
from ...runtime.adapters import Adapter
from ..bind import BoundRule
from ..calibrate import CALIB_HINT, NO_CALIB, HessianAccumulator
from ..context import Context
from ..graph import ModelGraph
from ..lora import BaseSite, base_sites, base_weight
from ..lowrank import ErrorFit, InputMoment, error_adapter
from ..stream import Stream
from ..threads import one_thread

__all__ = ["ErrorFit", "ErrorFigures", "InputMoment", "error_adapter", "fit_error_adapters", "error_tensors",
           "adapter_tensors", "error_details", "error_note"]


@dataclass(frozen=True)
class ErrorFigures:
    """A fit's output errors without its A and B: what the report needs of each target once the
    adapter's stored tensors exist (holding every fit's float32 A and B until the last target
    was fitted cost twice the fp16 adapters: 37 MiB on SmolLM2 at rank 32)."""

    before: float
    after: float
    in_sweep: bool = False  # fitted by the precision rule before, aimed at the drift target


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
    out = _put_prefitted(graph, ctx, adapters, dtype, put)
    readers: dict[fx.Node, list[str]] = {}  # input -> the targets reading it, in rule order
    for path in adapters:
        if path not in out:
            readers.setdefault(base_sites(graph, graph.targets[path])[0].x, []).append(path)
    if not readers:
        return out
    stream = Stream(graph, ctx.calib)
    with ctx.progress.task(f"fitting `init=error` adapters input by input (line {bound.line})",
                           total=len(adapters) - len(out)) as step:
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


def _put_prefitted(graph: ModelGraph, ctx: Context, adapters: dict[str, Adapter], dtype: torch.dtype,
                   put: Callable[[str, dict[str, torch.Tensor]], None]) -> dict[str, ErrorFigures]:
    """Puts the adapters the precision rule before fitted during its sweep (`ctx.error_fits`,
    module doc), taking them out of ctx; path -> their fits' errors."""
    out = {}
    for path, adapter in adapters.items():
        fit = ctx.error_fits.pop(path, None)
        if fit is None:
            continue
        if (fit.A.shape[0], fit.A.dtype) != (adapter.rank, dtype):  # the plan is this rule's: a bug if not
            raise AssertionError(f"{path}: fitted rank {fit.A.shape[0]} {fit.A.dtype}, the rule asks "
                                 f"rank {adapter.rank} {dtype}")
        tensors, figures = adapter_tensors(graph, base_sites(graph, graph.targets[path])[0], adapter, fit)
        out[path] = replace(figures, in_sweep=True)
        put(path, tensors)
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
                           f"sees, and {NO_CALIB}", line=bound.line, column=rule.span.column,
                           width=len("adapt"), source=ctx.source, filename=ctx.filename,
                           hint=f"{CALIB_HINT}; or use init=kaiming")


def error_tensors(graph: ModelGraph, site: BaseSite, adapter: Adapter, w: torch.Tensor, H: InputMoment,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], ErrorFigures]:
    """The adapter's tensors from the error of the target's base weight as encoded now, A and B
    stored in `dtype` (the fit in float64, then rounded once), and the fit's errors; `after` is
    the error left by the rounded adapter, the one the model computes with."""
    with one_thread():
        fit = error_adapter(w, base_weight(graph, site), H, adapter.rank, adapter.scale, dtype)
    return adapter_tensors(graph, site, adapter, fit)


def adapter_tensors(graph: ModelGraph, site: BaseSite, adapter: Adapter, fit: ErrorFit
                    ) -> tuple[dict[str, torch.Tensor], ErrorFigures]:
    """The adapter's stored tensors from a fit of the error of the target's base weight as it is
    now, and the fit's errors."""
    tensors = {"lora_A": fit.A, "lora_B": fit.B}
    if adapter.method == "dora":  # m = ‖ŵ + s·B·A‖ per row: the magnitude of the weight it starts as
        w_hat = base_weight(graph, site)
        tensors["lora_magnitude"] = torch.linalg.norm(w_hat + adapter.scale * fit.B.float() @ fit.A.float(), dim=1)
    return tensors, ErrorFigures(fit.before, fit.after)


def _left(fits: dict[str, ErrorFigures]) -> float | None:
    """Mean over the targets with a quantization error of the output error left after the adapter,
    as a fraction of before; None where none has one. A target left in full precision (`keep`, or
    kept by a budget) has none, and counted as 100% left it read 72% where the others left 43%."""
    ratios = [f.after / f.before for f in fits.values() if f.before > 0]
    return sum(ratios) / len(ratios) if ratios else None


def error_details(fits: dict[str, ErrorFigures]) -> dict:
    return {"init": "error", "output_error_left": _left(fits),
            "fitted_in_gptq_sweep": sum(f.in_sweep for f in fits.values())}


def error_note(fits: dict[str, ErrorFigures]) -> str:
    swept = sum(f.in_sweep for f in fits.values())
    how = "" if not swept else (
        f"; {swept} of them fitted during the GPTQ sweep before, so the later layers were calibrated on "
        "them, and aimed at what the original model computed (the error there includes the drift of "
        "the inputs)")
    left, exact = _left(fits), sum(f.before <= 0 for f in fits.values())
    if left is None:
        return (f"init=error: none of the {len(fits)} targets has a quantization error (each is left in full "
                "precision): each adapter starts with B = 0, as a fresh one does")
    n = len(fits) - exact
    over = f"{n} target{'s' * (n != 1)}" + (
        f"; {exact} left in full precision {'has' if exact == 1 else 'have'} no error" if exact else "")
    return (f"init=error: the adapters leave {left:.1%} of the quantization's output error on the "
            f"calibration inputs (mean over {over}{how})")
