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


def main_output(out) -> torch.Tensor:
    """The tensor a model is judged by: its logits, else its last hidden state, else its first output."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out[0]
