"""One weight in one format: the candidates a rule offers, and encoding a weight into one of them
(RTN or GPTQ into packed codes, a half-precision copy, or left as it is)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from ...dsl import ast as A
from ...dsl.schema import HALF_DTYPES
from ...runtime.formats import NotFinite, OutOfRange, QuantizedWeight, dequantize, from_rule, group_size, nbytes, quantize_rtn
from .clip import column_weights, rtn_params
from .gptq import gptq

__all__ = ["Candidate", "Encoded", "encode", "decode", "encoded_bytes", "HALF", "NotFinite", "OutOfRange"]

HALF = {fmt: getattr(torch, dtype) for fmt, dtype in HALF_DTYPES.items()}
# An encoded weight: packed codes, a half-precision copy, or None for "left as it is".
Encoded = Union[QuantizedWeight, torch.Tensor, None]


@dataclass(frozen=True)
class Candidate:
    """One format a target may get: `Candidate("int4", 64, True)`; group/sym/zero only for ints
    (`Candidate("int4", 64, False, "float")`: a float offset per group)."""

    format: str
    group: int | None = None
    sym: bool = True
    zero: str = "int"

    @classmethod
    def of(cls, node: A.Quantize | A.FormatChoice) -> "Candidate":
        if node.format in HALF or node.format == "keep":
            return cls(node.format)
        fmt = from_rule(node.format, node.get("group"), node.get("sym"), node.get("zero"))
        return cls(node.format, fmt.group, fmt.sym, fmt.zero)

    @property
    def is_packed(self) -> bool:
        return self.format not in HALF and self.format != "keep"

    def __str__(self) -> str:
        if not self.is_packed:
            return self.format
        group = "per-channel" if self.group is None else f"group={self.group}"
        return f"{self.format} {group}" + ("" if self.sym else " sym=false") + (
            " zero=float" if self.zero == "float" else "")


def encode(w: torch.Tensor, cand: Candidate, method: str = "rtn", H: torch.Tensor | None = None,
           damp: float = 0.01, act_order: bool = False, clip: str = "none", refit: bool = False) -> Encoded:
    """w [out, in] in `cand`'s format. GPTQ needs H [in, in]; clip=output H or its diagonal [in].
    `refit` (GPTQ only) refits the grid to the codes (passes/precision/refit.py)."""
    if cand.format == "keep":
        return None
    if cand.format in HALF:
        half = HALF[cand.format]
        if not torch.isfinite(w).all():  # max(|w|) is NaN there, and the range check let 1e6 become inf
            raise NotFinite("its weight holds NaN or inf; fix the model's weights before quantizing")
        largest = float(w.abs().max()) if w.numel() else 0.0
        if largest > torch.finfo(half).max:  # stored as inf, silently, and every output with it
            raise OutOfRange(f"weights up to {largest:g} exceed {cand.format}'s largest, {torch.finfo(half).max:g}")
        return w.to(half)
    fmt = from_rule(cand.format, cand.group, cand.sym, cand.zero)
    if method == "gptq":
        return gptq(w, H, fmt, damp=damp, act_order=act_order, clip=clip, refit=refit)
    if clip != "none":
        cols = w.shape[1]
        return quantize_rtn(w, fmt, rtn_params(fmt, group_size(fmt, cols), column_weights(clip, H), cols))
    return quantize_rtn(w, fmt)


def decode(enc: Encoded, w: torch.Tensor) -> torch.Tensor:
    """The float32 weight the rewritten graph computes with (`w` itself for keep)."""
    if enc is None:
        return w.float()
    if isinstance(enc, QuantizedWeight):
        return dequantize(enc)
    return enc.float()


def encoded_bytes(enc: Encoded, item) -> int:
    """Stored bytes of `item`'s weight alone (packed codes + scales + zeros, or the tensor). For
    `keep` the weight as the model holds it: a bf16 model's was counted at 32 bits from the fp32
    copy the encoders read, and the budget solver quantized more than its budget needed."""
    if isinstance(enc, QuantizedWeight):
        return nbytes(enc)
    if enc is None:
        return item.w.numel() * item.stored.itemsize
    return enc.numel() * enc.element_size()
