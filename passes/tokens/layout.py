"""Where the batch and the sequence sit in a graph value, read from its symbolic shape.

Capture makes the batch and the sequence length symbols (`s72`, `s53`, named "batch"/"seq" on the
inputs), so every tensor's `meta["val"]` says which of its dims are the batch, the sequence, or
both flattened into one (GPT-2's [B·S, D] linears) — no model-specific names needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...runtime.token_ops import FLAT, NO_BATCH
from ..token_attention import MASK_INPUT  # the input whose nonzeros are the real tokens

__all__ = ["Symbols", "Layout", "FLAT", "NO_BATCH", "MASK_INPUT"]



@dataclass(frozen=True)
class Layout:
    """`batch`: the batch dim, FLAT (`seq` holds batch×seq) or NO_BATCH; `seq`: the sequence dim."""

    batch: int
    seq: int

    @property
    def dims(self) -> frozenset[int]:
        return frozenset(d for d in (self.batch, self.seq) if d >= 0)


@dataclass(frozen=True)
class Symbols:
    """The batch and sequence symbols. `seq_size`: a model captured with a fixed sequence length
    (a ViT's patches) has no sequence symbol; its length is then this constant, which the caller
    has checked no other dim of the blocks' values shares."""

    batch: frozenset[str]
    seq: frozenset[str]
    seq_size: Optional[int] = None

    def role(self, size) -> Optional[str]:
        """"batch", "seq", "flat" (batch×seq) or None (a constant or another symbol)."""
        if not isinstance(size, torch.SymInt):
            return "seq" if self.seq_size is not None and size == self.seq_size else None
        expr = size.node.expr
        name = str(expr)
        if name in self.batch:
            return "batch"
        if name in self.seq:
            return "seq"
        if expr.is_Mul and len(expr.args) == 2:
            names = {str(a) for a in expr.args}
            seq = self.seq | ({str(self.seq_size)} if self.seq_size is not None else set())
            if names & self.batch and names & seq:
                return "flat"
        return None

    def layout(self, val) -> Optional[Layout]:
        """The layout of a tensor value with a sequence dim (or a flattened batch×seq), else None."""
        if not isinstance(val, torch.Tensor):
            return None
        roles = [self.role(s) for s in val.shape]
        if "flat" in roles:
            return Layout(FLAT, roles.index("flat"))
        if "seq" not in roles:
            return None
        return Layout(roles.index("batch") if "batch" in roles else NO_BATCH, roles.index("seq"))

    def aligned(self, val, out: Layout, out_rank: int) -> Optional[Layout]:
        """The layout of broadcast operand `val` at the positions of output layout `out`
        (right-aligned, as broadcasting aligns them), or None when it has no sequence there.
        A batch dim of size 1 is NO_BATCH (the same rows for every sequence)."""
        shift = out_rank - val.dim()
        seq = out.seq - shift
        if seq < 0:
            return None
        role = self.role(val.shape[seq])
        if out.batch == FLAT:
            return Layout(FLAT, seq) if role == "flat" else None
        if role != "seq":
            return None
        batch = out.batch - shift if out.batch >= 0 else -1
        if batch >= 0 and self.role(val.shape[batch]) == "batch":
            return Layout(batch, seq)
        return Layout(NO_BATCH, seq)

    def per_sequence(self, val, out: Layout, out_rank: int) -> bool:
        """True when operand `val` varies by sequence but not by position (a [B, 1, 1, D] value):
        it has no packed form."""
        shift = out_rank - val.dim()
        batch = out.batch - shift
        return out.batch >= 0 and batch >= 0 and self.role(val.shape[batch]) == "batch"
