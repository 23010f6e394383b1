"""Counting stored bytes: one counter for the plan, the report and the evaluation tables, so that
tied weights and packed buffers are counted the same way everywhere."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["param_bytes", "tensor_bytes"]


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the given tensors' elements (None skipped), each counted as given."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def param_bytes(module: nn.Module) -> int:
    """Bytes held by parameters and buffers; tensors sharing storage (tied weights) count once."""
    seen: set[Any] = set()
    total = 0
    tensors = list(module.parameters()) + list(module.buffers())
    for t in tensors:
        key, size = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += size
    return total


def _storage_key(t: torch.Tensor) -> tuple[Any, int]:
    nbytes = t.numel() * t.element_size()
    if t.device.type == "meta" or nbytes == 0:
        return ("id", id(t)), nbytes
    try:
        storage = t.untyped_storage()
        return ("ptr", t.device.type, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        # Tensor subclasses (packed formats) may have no plain storage; count their own size.
        return ("id", id(t)), nbytes
