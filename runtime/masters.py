"""Float32 masters for half-precision adapters while they train, and what a tensor is declared
as meanwhile: an artifact written inside (a checkpoint between steps) stores the dtype the
program declares, as the rounding on the way out would, never the float32 master (which no
load accepted: "… is torch.float32 but the program expects torch.float16")."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["float32_masters", "as_declared"]

# id(parameter) -> (the parameter, its own dtype), for every master held by a float32_masters now.
_HELD: dict[int, tuple[nn.Parameter, torch.dtype]] = {}


@contextmanager
def float32_masters(params: list[nn.Parameter]):
    """Inside, the fp16/bf16 parameters among `params` hold float32 copies of their values (the
    same Parameter objects, so an optimizer built over them still applies); after, they are
    rounded back to their dtype once, also on an exception. Optimizers need this: AdamW directly
    on fp16 adapters divides by a second moment that underflows (NaN at the second step on a tiny
    Llama), and on bf16 ones rounds away every update below 2^-9 of a weight (at lr 1e-4, 72% of
    A's entries never moved in 10 steps). The adapter's casts up read float32 as well as half."""
    half = [(p, p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)]
    for p, dtype in half:
        p.data = p.data.float()
        _HELD[id(p)] = (p, dtype)
    try:
        yield
    finally:
        for p, dtype in half:
            _HELD.pop(id(p), None)
            p.data = p.data.to(dtype)
            p.grad = None  # a float32 gradient would not fit the rounded parameter


def as_declared(t: torch.Tensor) -> torch.Tensor:
    """`t` as its program declares it: a float32 master rounded to its own dtype, else `t`."""
    held = _HELD.get(id(t))
    return t.detach().to(held[1]) if held is not None and held[0] is t else t
