"""Low-rank error corrections fitted during the sequential sweep, for an `adapt … init=error` that
comes right after this precision rule (the pipeline hands its plan over as `ctx.error_plans`).

    quantize blocks.*.** : Linear int2 group=64 sym=false zero=float method=gptq clip=output
    adapt    blocks.*.** : Linear lora rank=32 init=error dtype=fp16

Fitted after the rule, the adapters correct errors that every later block's GPTQ had already
compensated for on inputs without them. Fitted here instead, each as soon as its target is
encoded and on the same H its GPTQ used, the rest of the sweep computes with Ŵ + s·B·A, so each
later sublayer is calibrated on the model as it will compute. And both GPTQ and the adapter aim
at what the original layer computed on the original model's inputs (passes/lowrank.py's
`drift_target`, from C = E[x_ref xᵀ], which the sweep gathers with a reference stream), so each
layer also undoes some of the drift the compressed layers before it left. A target whose output
joins the residual stream (o_proj, down_proj: passes/residual.py) aims at the original model's
sum there, so it also cancels the stream's own drift as far as its input predicts it (D = E[(r_ref
− r) xᵀ] from both streams' values).

SmolLM2-135M int2 g64 zero=float clip=output + r32 fp16 adapters, no refit (fp32 28.79; a direct
layer-by-layer loop on the Hugging Face model, 2026-12-02, equal to the pass to the third decimal):
perplexity 87.5 fitted after the rule, 80.0 fitted along, 62.8 aimed at the drift target, 60.5 with
the residual stream's drift too (on the 2,975 text tokens neither the eval nor the calibration
read: 45.2 -> 41.3, fp32 15.6). Neighbouring ridges move int2 perplexity by ±5% either way
(residual ridge 1: 61.9, 3: 66.8, 10: 60.5, 30: 60.6; down_proj alone 66.8), so single figures
are noisy. Calibration size matters more: the same loop on 46 windows instead of 24, 50.5 (the
pass on 47 in the benchmark: 54.0). The fits
wait in `ctx.error_fits` for the adapt rule.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..context import Context, rule_error
from ..lowrank import drift_target, error_adapter
from .encode import Encoded, decode
from .targets import Item, site_inputs

__all__ = ["ErrorCorrections", "error_corrections", "sweep_details", "few_rows_note", "ROWS_PER_FEATURE"]

# Below this many calibration rows per input feature the drift regression overfits: SmolLM2-135M's
# down_proj reads 1,536 features; 3,072 rows (2 per feature) left int2 at x2.11 of fp32, 6,016
# (3.9) at x1.87 (benchmarks/precision.py, no refit).
ROWS_PER_FEATURE = 4


class ErrorCorrections:
    """The sweep's `compensate` (sequential.py's `Compensate`) for the targets the adapt rule on
    `line` planned: each one's drift target (`aim`), then GPTQ of it and its adapter fitted to it
    (`encode`). It counts the targets it aimed at the residual stream's drift too (`residual`)."""

    def __init__(self, plans: dict, line: int, ctx: Context):
        self.plans, self.line, self.ctx, self.residual, self.widest = plans, line, ctx, 0, 0

    def aim(self, it: Item, H: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor | None:
        """The float64 weight `it` is encoded toward, or None for a target without an adapter."""
        plan = self.plans.get(it.path)
        if plan is None or plan.rank > min(it.w.shape):
            return None
        self.widest = max(self.widest, H.shape[0])
        self.residual += D is not None
        return drift_target(it.w, H, C, D=D)

    def encode(self, it: Item, H: torch.Tensor, aim: torch.Tensor | None,
               encode_one) -> tuple[Encoded, torch.Tensor | None]:
        if aim is None:
            return encode_one(it, H), None
        enc = encode_one(replace(it, w=aim.float()), H)
        if enc is None:  # kept: no error to correct
            return None, None
        plan = self.plans[it.path]
        fit = error_adapter(aim, decode(enc, it.w), H, plan.rank, plan.scale, plan.torch_dtype)
        self.ctx.error_fits[it.path] = fit
        return enc, plan.scale * (fit.B.float() @ fit.A.float())


def few_rows_note(corrections: ErrorCorrections | None, rows: int) -> tuple[str, ...]:
    """A note when the drift targets were regressions on fewer than ROWS_PER_FEATURE calibration
    rows per input feature of the widest target, where they overfit (measured below)."""
    if corrections is None or not corrections.widest or rows >= ROWS_PER_FEATURE * corrections.widest:
        return ()
    return (f"init=error aimed each target at a regression on {rows:,} calibration rows, for inputs up to "
            f"{corrections.widest} wide: fewer than {ROWS_PER_FEATURE} rows per input feature overfit "
            "(SmolLM2-135M int2 g64 with r32 adapters: x2.11 of fp32 on 3,072 rows, x1.87 on 6,016); "
            "more calibration text helps",)


def error_corrections(bound, ctx: Context, items: list[Item]) -> ErrorCorrections | None:
    """The sweep's `compensate` callback, or None when no target has a plan. A target the plan
    cannot fit (a kept weight, a rank above its smaller dimension: the adapt rule reports that)
    is encoded as without a plan and fitted, or refused, by the adapt rule. A target called at
    several places on different inputs is refused: the fit pairs one input's rows with the
    original model's."""
    plans = {it.path: ctx.error_plans[it.path] for it in items if it.path in ctx.error_plans}
    if not plans:
        return None
    for it in items:
        inputs = len(site_inputs(it))
        if it.path in plans and inputs > 1:
            raise rule_error(bound, ctx, "unsupported",
                             f"{it.path} is called at {inputs} places on different inputs, and the `adapt … "
                             f"init=error` on line {plans[it.path].line} fits its adapter to one input's error",
                             "leave that linear out of the adapt rule's selector, or give it init=gaussian")
    return ErrorCorrections(plans, next(iter(plans.values())).line, ctx)


def sweep_details(true_sequential: bool, corrections: ErrorCorrections | None) -> dict:
    """The report's account of the sweep: by layer when asked or when it fitted adapters."""
    if corrections is None:
        return {"sequential": "by layer" if true_sequential else True}
    return {"sequential": "by layer", "error_adapters_fitted_for_line": corrections.line,
            "aimed_at_residual_stream": corrections.residual}
