"""Comparing a model's outputs with another's, whatever the output type (ModelOutput, dict):
shared by the tests that hold slimfx against PEFT. A plain module (not conftest) so test files
anywhere under tests/ can import it."""
from __future__ import annotations

import torch


def outputs(model, inputs) -> list[torch.Tensor]:
    """The tensors of `model(**inputs)`, in output order, computed without gradients."""
    with torch.no_grad():
        out = model(**inputs)
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))
