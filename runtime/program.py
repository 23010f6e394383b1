"""What a compiled model is made of, with no compiler attached: the fx GraphModule, its inputs,
how to rebuild the model's output, and the module table. Passes (passes/graph.py's ModelGraph
adds the index of blocks and targets) and the runtime (CompiledModel, artifacts) both build on
it, so a saved model needs nothing of the compiler to load and run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

__all__ = ["Program", "ModuleInfo", "ParamInfo", "InputInfo", "OutputSpec", "CallInfo", "devices_named", "flag_json",
           "NOT_JSON"]


# ---- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    """One parameter or buffer owned directly by a module, as it was at capture time."""

    name: str  # full dotted name, e.g. "model.layers.0.mlp.up_proj.weight"
    shape: tuple[int, ...]
    dtype: str  # "float32"
    nbytes: int
    storage: int  # equal numbers = the same tensor (tied weights)
    is_buffer: bool = False


@dataclass(frozen=True)
class ModuleInfo:
    """A module of the captured model: metadata only, never a tensor."""

    path: str  # "" for the root
    cls: str
    classes: tuple[str, ...]  # class names of its MRO, most derived first
    children: tuple[str, ...]  # child names in definition order
    is_list: bool  # ModuleList/Sequential: children are addressed by position
    params: tuple[ParamInfo, ...]


@dataclass(frozen=True)
class InputInfo:
    """A graph input: traced shape (ints, or symbol names for dynamic dims) and dim roles."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype
    dims: dict[int, str] = field(compare=False)  # {0: "batch", 1: "seq"}
    # False where a call may not leave it out to be filled (runtime/inputs.py): position_ids of a
    # model that numbers positions its own way (RoBERTa from its padding index, OPT from the mask)
    fill: bool = field(default=True, compare=False)
    # dim -> the most it may be, where the captured model bounds it (BERT's 128 positions: export's
    # range for that dim's symbol). A loaded artifact has no export guard to say so, and a longer
    # input failed inside the graph ("The expanded size of the tensor (129) must match …").
    limits: dict[int, int] = field(default_factory=dict, compare=False)


def input_shape(value) -> tuple[int | str, ...]:
    """An InputInfo's shape from a placeholder's value: ints, and symbol names for dynamic dims."""
    return tuple(d if isinstance(d, int) else str(d) for d in value.shape)


@dataclass(frozen=True)
class OutputSpec:
    """How to rebuild the model's output (a ModelOutput, tuple, dict …) from the flat tensors."""

    spec: Any  # a pytree TreeSpec
    constants: tuple[Any, ...]  # per leaf: the constant leaf value; None where a tensor goes
    # Per leaf: is it one of the graph's output tensors? A model may return None itself (`return
    # h, None`): counted as a tensor, it took one too many and the call died of StopIteration.
    # None (artifacts of before 2026-12-06): every None constant is a tensor, as they meant.
    tensors: tuple[bool, ...] | None = None

    @property
    def tensor_leaves(self) -> tuple[bool, ...]:
        """Per leaf: True where a graph output tensor goes, False for a constant (None included)."""
        if self.tensors is not None:
            return self.tensors
        return tuple(c is None for c in self.constants)


@dataclass(frozen=True)
class CallInfo:
    """How the original model was called at capture, beyond the graph's tensor inputs."""

    # forward's parameters that can be given by position, in its order (HF BERT: input_ids,
    # attention_mask, token_type_ids, …): a call by position binds by these, not by the graph's
    # input order (the example dict's). () when unknown (artifacts of before 2026-12-05).
    positional: tuple[str, ...] = ()
    # The non-tensor keyword inputs the graph was captured with (use_cache=False,
    # output_hidden_states=True): a call may repeat them; another value is another graph.
    flags: tuple[tuple[str, Any], ...] = ()
    # The value each flag the example left out had in the capture (forward's default, HF's
    # config.return_dict …): a call may repeat it. () from artifacts of before 2026-12-06.
    defaults: tuple[tuple[str, Any], ...] = ()
    # forward's own default of each flag the example gave another value (k=3 where forward says
    # k=1): a call leaving it out means the default, which the graph does not compute. () from
    # artifacts of before 2026-12-06 (such a call then gets the captured value, as it did).
    declared: tuple[tuple[str, Any], ...] = ()
    # The most tokens one sequence may hold, as the captured model's config said (config_positions):
    # perplexity()'s default window for the compiled model is the original's. None where it says
    # nothing, and in artifacts of before 2026-12-08.
    positions: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON for meta.json: values flag_json can write (the others are in `unstorable`)."""
        return {"positional": list(self.positional), "flags": _storable(self.flags),
                "defaults": _storable(self.defaults), "declared": _storable(self.declared),
                **({"positions": self.positions} if self.positions is not None else {})}

    @property
    def unstorable(self) -> list[str]:
        """The flags the graph was captured with whose values meta.json cannot hold: a model loaded
        without them refused those very values ("captured without dims")."""
        return [k for k, v in self.flags if flag_json(v) is NOT_JSON]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "CallInfo":
        d = d or {}
        parts = [tuple((k, _flag_value(v)) for k, v in (d.get(part) or {}).items())
                 for part in ("flags", "defaults", "declared")]
        positions = d.get("positions")
        positions = positions if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0 else None
        return cls(tuple(d.get("positional") or ()), *parts, positions)


def config_positions(config: Any) -> int | None:
    """The most tokens one sequence may hold, as a Hugging Face config says (None when it says
    nothing). RoBERTa's positions start after its padding index."""
    for name in ("max_position_embeddings", "n_positions"):
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 0:
            if "roberta" in str(getattr(config, "model_type", "")) or getattr(config, "model_type", "") == "camembert":
                n -= (getattr(config, "pad_token_id", None) or 0) + 1
            return n
    return None


NOT_JSON = object()  # what flag_json gives for a value it cannot write


def flag_json(value: Any, depth: int = 0) -> Any:
    """A flag's value as JSON: None, bools, ints, floats and text as they are; tuples and
    lists of them tagged ({"tuple": [...]}), so that a loaded model tells (1,) from [1] as the
    capture did (`dims=(1,)` was dropped from meta.json, and the loaded model refused it);
    NOT_JSON for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):  # inf and nan too: JSON's Infinity, NaN
        return value
    if isinstance(value, (tuple, list)) and depth < 8:
        items = [flag_json(v, depth + 1) for v in value]
        if all(i is not NOT_JSON for i in items):
            return {"tuple" if isinstance(value, tuple) else "list": items}
    return NOT_JSON


def _flag_value(doc: Any) -> Any:
    """flag_json's value back (a plain JSON value from artifacts before the tags, as it is). A
    value no save writes (an object that is no tag) is refused: it loaded, and only the next save
    said so."""
    if isinstance(doc, dict) and len(doc) == 1:
        ((kind, items),) = doc.items()
        if kind in ("tuple", "list") and isinstance(items, list):
            values = [_flag_value(v) for v in items]
            return tuple(values) if kind == "tuple" else values
    if flag_json(doc) is NOT_JSON:
        raise ValueError(f"a call flag's value {doc!r} is none that a save writes")
    return doc


def _storable(pairs) -> dict[str, Any]:
    return {k: j for k, v in pairs if (j := flag_json(v)) is not NOT_JSON}


class Program:
    """A runnable graph: `module` (an fx GraphModule over aten and slimfx ops) called with the
    inputs in `inputs` order, returning a flat tuple that `restructure` turns back into the
    model's own output type.
    """

    def __init__(self, module: fx.GraphModule, modules: dict[str, ModuleInfo],
                 inputs: tuple[InputInfo, ...], outputs: OutputSpec, model_class: str,
                 call: CallInfo | None = None):
        self.module = module
        self.modules = modules
        self.inputs = inputs
        self.outputs = outputs
        self.model_class = model_class
        self.call = call or CallInfo()

    # ---- running ----
    def __call__(self, *args, **kwargs) -> Any:
        """Run like the original model (inputs by position or name) and rebuild its output."""
        return self.restructure(self.run_flat(*args, **kwargs))

    def run_flat(self, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        names = [i.name for i in self.inputs]
        bound = dict(zip(names, args), **kwargs)
        missing = [n for n in names if n not in bound]
        extra = [n for n in bound if n not in names]
        if missing or extra:
            raise TypeError(f"{self.model_class} graph takes inputs {names}; "
                            f"missing {missing}, unexpected {extra}")
        return tuple(self.module(*(bound[n] for n in names)))

    def restructure(self, flat) -> Any:
        """The flat output tuple back in the model's own output structure."""
        tensors = iter(flat)
        leaves = [next(tensors) if is_tensor else c
                  for is_tensor, c in zip(self.outputs.tensor_leaves, self.outputs.constants)]
        return pytree.tree_unflatten(leaves, self.outputs.spec)

    def param(self, name: str) -> torch.Tensor:
        """A parameter or buffer of the graph module by its full dotted name."""
        owner, _, attr = name.rpartition(".")
        return getattr(self.module.get_submodule(owner) if owner else self.module, attr)

    def __repr__(self) -> str:
        return f"Program({self.model_class}, {len(self.module.graph.nodes)} nodes)"


def devices_named(gm: torch.fx.GraphModule) -> set[torch.device]:
    """The devices a graph's nodes name (aten.arange(device=…), export's dtype/device checks):
    where it was captured, and where its tensors must be."""
    found: set[torch.device] = set()

    def walk(value: Any) -> None:
        if isinstance(value, torch.device):
            found.add(value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    for node in gm.graph.nodes:
        walk((node.args, node.kwargs))
    return found
