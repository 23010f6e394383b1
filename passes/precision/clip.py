"""`clip=mse|output`: a search per quantization group for the range that rounds best.

Round-to-nearest over a group's full range spends codes on its largest weights; shrinking the
range (the scale and zero point of `group_params(…, shrink=α)`) rounds the bulk of the group more
finely and clamps the few outliers. For each group the search tries every α of `SHRINKS` and keeps
the one of least squared error — plain (`mse`) or each input column weighted by E[x_j²], the
diagonal of the calibration Hessian (`output`: the output error a weight's rounding causes, to
first order). α = 1 is the unsearched range, so the search is never worse than none on the
measure it minimizes. Used before RTN and inside GPTQ (whose groups take their ranges as they
start).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...runtime.formats import QuantFormat, dequantize_codes, group_params, quantize_codes

__all__ = ["SHRINKS", "CLIPS", "searched_params", "column_weights", "rtn_params"]

CLIPS = ("none", "mse", "output")
# 1.0 first: ties keep the unsearched range.
SHRINKS = tuple(round(1.0 - 0.025 * i, 3) for i in range(13))  # 1.0 … 0.7


def searched_params(wg: torch.Tensor, fmt: QuantFormat, weights: Optional[torch.Tensor] = None,
                    shrinks=SHRINKS) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scale and zero point of each group of `wg` [..., g] (as `group_params`) whose rounding error
    Σ_j weights_j (w_j − ŵ_j)² is least over the shrink factors. `weights` broadcasts to `wg`."""
    wg = wg.float()
    best_err = best_scale = best_zero = None
    for shrink in shrinks:
        scale, zero = group_params(wg, fmt, shrink)
        z = None if zero is None else zero.unsqueeze(-1)
        codes = quantize_codes(wg, scale.unsqueeze(-1), z, fmt)
        d = dequantize_codes(codes, scale.unsqueeze(-1), z, fmt) - wg
        err = (d * d if weights is None else d * d * weights).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def column_weights(clip: str, H: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per input column: E[x_j²] for `output` (from H = E[x xᵀ] [in, in], or its diagonal [in]),
    None (all equal) for `mse`."""
    if clip == "output":
        if H is None:
            raise ValueError("clip=output needs the calibration Hessian of the layer's input")
        return (H.diagonal() if H.dim() == 2 else H).float().clamp(min=0)
    return None


def rtn_params(fmt: QuantFormat, g: int, weights: Optional[torch.Tensor], cols: int) -> Callable:
    """`quantize_rtn`'s `params` for a clipping search over a weight of `cols` inputs: groups
    [out, n, g] -> (scale, zero)."""
    if weights is None and cols % g:
        weights = torch.ones(cols)  # so that the padding below weighs nothing

    def params(grouped: torch.Tensor):
        w = None
        if weights is not None:  # [in] -> [n, g], the ragged last group's padding weighted 0
            w = torch.nn.functional.pad(weights.to(grouped.device), (0, -weights.numel() % g)).view(-1, g)
        return searched_params(grouped, fmt, w)

    return params
