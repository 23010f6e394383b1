"""Which input holds a model's token ids: the integer input an embedding table reads, whatever
forward calls it (`input_ids`, `tokens`, `idx`). The causal probe, a bare calibration tensor and
the lm loss all ask; each assumed `input_ids`, and a model taking `tokens` was probed as not
causal, died inside a pass on `calib=tensor`, and could not be trained with loss='lm'."""
from __future__ import annotations

import torch

from .inputs import FILLABLE

__all__ = ["table_rows", "token_ids_input", "token_ids_name"]

aten = torch.ops.aten


def token_ids_input(program) -> tuple[str | None, object]:
    """(the name of the integer input an embedding table reads, that table's fake value: its rows
    are the vocabulary) of `program` (a ModelGraph or Program: its fx `module` and `inputs`).
    `input_ids` first where several are; else the one whose table has the most rows (the
    vocabulary, not a position table: `positions` was taken for the ids of a model that reads it
    first, and loss='lm' trained on predicting positions); never an input a call may leave out
    and have filled (token_type_ids, position_ids). (None, None) where there is none."""
    # fx names its nodes itself (`forward(self, input)` is node `input_1`): the inputs by position
    placeholders = [n for n in program.module.graph.nodes if n.op == "placeholder"]
    named = {p: i.name for p, i in zip(placeholders, program.inputs)}
    found: dict[str, object] = {}
    for n in program.module.graph.nodes:
        if n.op == "call_function" and n.target is aten.embedding.default and len(n.args) > 1:
            source = _placeholder_of(n.args[1])
            val = getattr(source, "meta", {}).get("val")
            if source in named and isinstance(val, torch.Tensor) and not val.is_floating_point():
                # per input the largest table it reaches: a position table reached through
                # arange(ids.shape[1]) is not the vocabulary, whichever is read first
                table, name = n.args[0].meta.get("val"), named[source]
                if name not in found or table_rows(table) > table_rows(found[name]):
                    found[name] = table
    if "input_ids" in found:
        return "input_ids", found["input_ids"]
    candidates = [k for k in found if k not in FILLABLE]
    name = max(candidates, key=lambda k: table_rows(found[k]), default=None)  # the first of equals
    return name, found.get(name)


def token_ids_name(program) -> str:
    """token_ids_input's name, `input_ids` where no input is read by an embedding."""
    return token_ids_input(program)[0] or "input_ids"


def table_rows(table) -> int:
    """An embedding table's rows (its vocabulary, for the ids' one); 0 for no table."""
    shape = getattr(table, "shape", None)
    return int(shape[0]) if shape else 0


def _placeholder_of(node, depth: int = 4):
    """The input `node` is, or is a reshape of (CLIP views its ids first), else None."""
    for _ in range(depth):
        if getattr(node, "op", None) == "placeholder":
            return node
        if getattr(node, "op", None) != "call_function" or not node.args:
            return None
        node = node.args[0]
    return None
