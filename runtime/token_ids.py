"""Which input holds a model's token ids: the integer input an embedding table reads, whatever
forward calls it (`input_ids`, `tokens`, `idx`). The causal probe, a bare calibration tensor and
the lm loss all ask; each assumed `input_ids`, and a model taking `tokens` was probed as not
causal, died inside a pass on `calib=tensor`, and could not be trained with loss='lm'."""
from __future__ import annotations

import torch
from torch import fx

from .inputs import FILLABLE

__all__ = ["token_ids_input", "token_ids_name"]

aten = torch.ops.aten


def token_ids_input(module: fx.GraphModule) -> tuple[str | None, object]:
    """(the name of the integer input an embedding table reads, that table's fake value: its rows
    are the vocabulary), `input_ids` first where several are, never an input a call may leave
    out and have filled (token_type_ids, position_ids: BERT reads them through embeddings too);
    (None, None) where there is none."""
    found: dict[str, object] = {}
    for n in module.graph.nodes:
        if n.op == "call_function" and n.target is aten.embedding.default and len(n.args) > 1:
            source = _placeholder_of(n.args[1])
            val = getattr(source, "meta", {}).get("val")
            if source is not None and isinstance(val, torch.Tensor) and not val.is_floating_point():
                found.setdefault(source.name, n.args[0].meta.get("val"))
    name = "input_ids" if "input_ids" in found else next((k for k in found if k not in FILLABLE), None)
    return name, found.get(name)


def token_ids_name(module: fx.GraphModule) -> str:
    """token_ids_input's name, `input_ids` where no input is read by an embedding."""
    return token_ids_input(module)[0] or "input_ids"


def _placeholder_of(node, depth: int = 4):
    """The input `node` is, or is a reshape of (CLIP views its ids first), else None."""
    for _ in range(depth):
        if getattr(node, "op", None) == "placeholder":
            return node
        if getattr(node, "op", None) != "call_function" or not node.args:
            return None
        node = node.args[0]
    return None
