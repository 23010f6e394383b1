"""One intra-op thread for work made of many small dense ops (GPTQ's column loop, the
eigendecompositions and SVDs of `adapt … init=error`). Measured on the 2-core machines: GPTQ on a
576×576 layer 2.3× slower with 2 threads than with 1; a float64 eigh of a 576×576 Hessian 1.3 s
with 2 threads beside other work, 0.19 s with 1."""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["one_thread"]


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
