"""Adapters in a compiled graph: how their nodes are tagged and their parameters named.

The adapter pass (passes/adapters/, through the core primitive passes/lora.py) adds, beside a
target's base linear `y = base(x)`, the nodes of

    LoRA:  out = y + (alpha/rank) · B(A(dropout(x)))
    DoRA:  out = y + (m/‖W + s·BA‖ − 1) · (y − bias) + (m/‖W + s·BA‖) · B(A(dropout(x))) · s

(PEFT's formulas, the norm taken per output row and detached). Every node it adds carries
`meta["custom"]["slimfx_adapter"]` (an `Adapter` record plus the node's `part`), which artifacts
keep, so the runtime (train/eval, merge, PEFT export), a later `quantize` and the code generator
find the adapter of a target without knowing how it was built. Its parameters live on the target
module under the names in `PARAMS` (`….q_proj.lora_A` [r, in], `lora_B` [out, r],
`lora_magnitude` [out]) and are the compiled model's only trainable parameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import fx
from .forward_parts import recompile

__all__ = ["Adapter", "META_KEY", "PARAMS", "tag", "tag_of", "is_adapter_param", "adapters_of",
           "adapter_nodes", "output_node", "set_dropout", "adapter_param_names", "STORED_DTYPES"]

META_KEY = "slimfx_adapter"
# `adapt … dtype=`: what A and B may be stored in (passes/adapters/storage.py rounds them).
STORED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARAMS = ("lora_A", "lora_B", "lora_magnitude")
_DROPOUT = torch.ops.aten.dropout.default


@dataclass(frozen=True)
class Adapter:
    """One target's adapter, as recorded on each of its nodes."""

    target: str  # module path of the adapted linear, e.g. "model.layers.0.self_attn.q_proj"
    method: str  # "lora" | "dora"
    rank: int
    alpha: float
    dropout: float
    transposed: bool  # the base weight is stored [in, out] (GPT-2's Conv1D)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_meta(cls, d: dict) -> "Adapter":
        return cls(d["target"], d["method"], int(d["rank"]), float(d["alpha"]), float(d["dropout"]),
                   bool(d["transposed"]))


def tag(node: fx.Node, adapter: Adapter, part: str) -> fx.Node:
    """Mark `node` as the `part` of `adapter` ("A", "B", "out", "weight", …)."""
    custom = dict(node.meta.get("custom") or {})
    custom[META_KEY] = {**asdict(adapter), "part": part}
    node.meta["custom"] = custom
    return node


def tag_of(node: fx.Node) -> dict | None:
    """The adapter record (with "part") of an adapter node, else None."""
    custom = node.meta.get("custom")
    return custom.get(META_KEY) if isinstance(custom, dict) else None


def is_adapter_param(name: str) -> bool:
    """Is the (dotted) parameter name one of an adapter's?"""
    return name.rsplit(".", 1)[-1] in PARAMS


def adapter_param_names(module: torch.nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters() if is_adapter_param(n)]


def adapters_of(gm: fx.GraphModule) -> dict[str, Adapter]:
    """target path -> its adapter, in graph order."""
    found: dict[str, Adapter] = {}
    for n in gm.graph.nodes:
        t = tag_of(n)
        if t is not None and t["target"] not in found:
            found[t["target"]] = Adapter.from_meta(t)
    return found


def adapter_nodes(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    """Every node of `target`'s adapter, in graph order."""
    return [n for n in gm.graph.nodes if (t := tag_of(n)) is not None and t["target"] == target]


def output_node(gm: fx.GraphModule, target: str) -> list[fx.Node]:
    """The adapter's `out` nodes (one per call of the base linear): `out.args[0]` is the base's y."""
    return [n for n in adapter_nodes(gm, target) if tag_of(n)["part"] == "out"]


def _dropouts(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """Adapter dropout nodes of the graph that runs and, while generated Triton kernels are
    installed, of the reference graph kept beside it (the one calls that train run)."""
    triton = getattr(gm, "_slimfx_triton", None)
    for graph in (gm.graph,) + ((triton[0],) if triton is not None else ()):
        for n in graph.nodes:
            if n.op == "call_function" and n.target is _DROPOUT and tag_of(n) is not None:
                yield n


def set_dropout(gm: fx.GraphModule, training: bool) -> bool:
    """Switch every adapter dropout node on (training) or off; recompile if any changed.

    The graph was captured in eval mode, so the only dropout in it is the adapters': its third
    argument (`train`) is the flag, rewritten here rather than read per call. DoRA's base term
    under dropout is inserted for training and removed for eval (runtime/dora_dropout.py), in
    the graph that training calls run: the reference one while generated Triton kernels are
    installed (they never run with dropout on)."""
    from .dora_dropout import set_dora_dropout

    changed = False
    for n in _dropouts(gm):
        if n.args[2] is not training:
            n.args = (n.args[0], n.args[1], training)
            changed = True
    triton = getattr(gm, "_slimfx_triton", None)
    changed = set_dora_dropout(gm.graph if triton is None else triton[0], training) or changed
    if changed:
        recompile(gm)
    return changed


def dropout_active(gm: fx.GraphModule) -> bool:
    """Is some adapter dropout on (training mode) with p > 0? Generated Triton kernels compute
    the adapter without it, so such calls run the reference graph."""
    return any(n.args[2] is True and float(n.args[1]) > 0 for n in _dropouts(gm))
