"""Run a model in inference mode for a while, then give every module its training flag back."""
from __future__ import annotations

import contextlib

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Trace or calibrate without dropout, then give every module its own training flag back (a
    plain `model.train()` afterwards would also switch on modules the user had frozen in eval)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
