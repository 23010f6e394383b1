"""Inputs a model's forward may omit, filled the way Hugging Face models fill them, so a compiled
model (whose graph takes every captured input) is called exactly like the original:
`cm(input_ids=ids)` works when the original allows `attention_mask=None`.

    attention_mask  -> ones [batch, seq]      (no padding)
    token_type_ids  -> zeros [batch, seq]     (one segment)
    position_ids    -> arange(seq) per row

Sizes come from an input the caller did give that has the same batch and sequence dims.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .program import InputInfo

__all__ = ["complete_inputs", "FILLABLE"]


def _ones(batch: int, seq: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.ones(batch, seq, dtype=dtype, device=device)


def _zeros(batch: int, seq: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.zeros(batch, seq, dtype=dtype, device=device)


def _positions(batch: int, seq: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.arange(seq, dtype=dtype, device=device).expand(batch, seq)


FILLABLE: dict[str, Callable[..., torch.Tensor]] = {
    "attention_mask": _ones, "token_type_ids": _zeros, "position_ids": _positions,
}


def complete_inputs(given: dict[str, Any], inputs: tuple[InputInfo, ...]) -> dict[str, Any]:
    """`given` plus a default for each omitted (or None) input in FILLABLE; anything else stays
    missing (the caller reports it)."""
    given = {k: v for k, v in given.items() if not (v is None and k in FILLABLE)}
    missing = [i for i in inputs if i.name not in given and i.name in FILLABLE and i.fill and _is_token_shaped(i)]
    if not missing:
        return given
    out = dict(given)
    for info in missing:
        size = _batch_seq(given, inputs, info)
        if size is None:
            return given  # nothing to size them by: the caller's missing-input error says what to pass
        (batch, seq), device = size
        out[info.name] = FILLABLE[info.name](batch, seq, info.dtype, device)
    return out


def _is_token_shaped(info: InputInfo) -> bool:
    return len(info.shape) == 2 and info.dims.get(0) == "batch" and info.dims.get(1) == "seq"


def _batch_seq(given: dict[str, Any], inputs: tuple[InputInfo, ...], missing: InputInfo):
    """[batch, seq] and device for `missing`, from a given input traced with its sequence symbol
    (T5's attention_mask goes with input_ids, not decoder_input_ids); else from any one."""
    # inputs_embeds [batch, seq, hidden] sizes them too (a call of embeddings alone could not leave the mask out)
    sized = [(info, given.get(info.name)) for info in inputs
             if len(info.shape) >= 2 and info.dims.get(0) == "batch" and info.dims.get(1) == "seq"]
    sized = [(info, v) for info, v in sized if isinstance(v, torch.Tensor) and v.dim() == len(info.shape)]
    same = [v for info, v in sized if str(info.shape[1]) == str(missing.shape[1])]
    for value in same or [v for _, v in sized]:
        return tuple(value.shape[:2]), value.device
    return None
