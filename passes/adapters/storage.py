"""`adapt … dtype=fp32|fp16|bf16`: the dtype an adapter's A and B are stored in.

    quantize blocks.*.** : Linear int2 group=64 method=gptq
    adapt    blocks.*.** : Linear lora rank=32 init=error dtype=fp16

A and B are computed (fresh, loaded `from=` a PEFT directory, or fitted by `init=error` in
float64) in float32, then rounded once to the stored dtype here; passes/lora.py reads each through
one cast up to the activations' dtype, so the adapter computes exactly as a float32 adapter holding
the rounded values. Half the bytes of fp32 adapters: a rank-r adapter of an in×out linear is
r·(in + out)·2 bytes.

DoRA's magnitude stays float32 whatever the dtype: it is [out] (a few KiB), and it scales the
whole output of the base linear, not just the low-rank term, so rounding it to fp16 would move
every output by up to 2^-11 of itself and a fresh DoRA adapter would no longer leave the outputs
unchanged.
"""
from __future__ import annotations

import torch

from ...runtime.adapters import STORED_DTYPES

__all__ = ["STORED_DTYPES", "ROUNDED", "store_as"]

ROUNDED = ("lora_A", "lora_B")  # the tensors `dtype=` applies to


def store_as(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`tensors` with A and B rounded to `dtype` (the same tensors when they already are)."""
    return {k: v.to(dtype) if k in ROUNDED else v for k, v in tensors.items()}
