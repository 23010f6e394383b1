"""Checks on what capture is given and what it returns: example inputs forward cannot take as
they are, a graph traced at other sizes than the example's that computes otherwise, outputs the
graph cannot take apart, and the buffers a forward writes (which capture must not run on the
user's model). capture.py calls them; each failure says what to change.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..dsl.errors import SpecError
from ..runtime.inputs import FILLABLE
from .eval_mode import eval_mode

__all__ = ["check_names", "refuse_nested_tensors", "check_at_example_sizes", "refuse_opaque_outputs",
           "written_attrs"]


# ---- what capture is given -------------------------------------------------------------------


def check_names(model: nn.Module, given: list[str]) -> None:
    """Example names forward does not take, or forward's required inputs the example leaves out:
    said before tracing (torch.export's TypeError came with "needs a model that torch.export can
    trace")."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    kinds = {p.kind for p in params.values()}
    star = next((p.name for p in params.values() if p.kind is p.VAR_POSITIONAL), None)
    if star is not None and star in given:  # {'xs': x} died inside export ("unexpected keyword argument 'xs'")
        refuse_var_positional(model)
    unknown = [n for n in given if n not in params] if inspect.Parameter.VAR_KEYWORD not in kinds else []
    missing = [p.name for p in params.values() if p.default is p.empty and p.name not in given
               and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if unknown or missing:
        said = "; ".join(f"{label} {names}" for label, names in (("it does not take", unknown),
                                                                  ("it needs", missing)) if names)
        raise TypeError(f"{type(model).__name__}.forward{inspect.signature(model.forward)} and the example inputs "
                        f"{given} disagree: {said}; name the example's inputs as forward's parameters")


# The inputs a call may leave out that capture checks: filled as runtime/inputs.py fills them,
# does the model compute what it computes with them left out?
CHECKED_FILLS = ("position_ids", "token_type_ids")


def unfillable_inputs(model: nn.Module, program, names: list[str], args: list, consts: dict) -> set[str]:
    """The inputs of CHECKED_FILLS the example gives with which the model computes otherwise,
    filled as a call that leaves them out is filled (runtime/inputs.py), than left out — on the
    example with its first row's first token made padding. RoBERTa numbers positions from its
    padding index, OPT from the mask's running sum; GPT-2 adds no type embedding without
    token_type_ids, and zeros add its first row to every token: their compiled models computed
    something else, silently. A forward that writes its own buffers runs on a copy (it moved the
    user's counter); one that cannot be copied leaves them unfillable (no telling)."""
    wanted = [n for n in CHECKED_FILLS if n in names]
    if not wanted:
        return set()
    if written_attrs(program.module()):
        try:
            model = copy.deepcopy(model)
        except Exception:  # noqa: BLE001 - any copy failure: a call must give them
            return set(wanted)
    return {n for n in wanted if not _fills_as_left_out(model, names, args, consts, n)}


def _fills_as_left_out(model: nn.Module, names: list[str], args: list, consts: dict, name: str) -> bool:
    given = dict(zip(names, args))
    value = given.pop(name)
    mask = given.get("attention_mask")
    if value.dim() != 2 or value.shape[1] < 2:
        return True
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > 1:
        mask = mask.clone()
        mask[0, 0] = 0  # left padding: OPT's positions start after it, counted ones do not
        given["attention_mask"] = mask
    # what a call that leaves it out is filled with, on the example's device (a GPU model refused a CPU one)
    filled = FILLABLE[name](*value.shape, value.dtype, value.device).contiguous()
    try:
        with torch.no_grad(), eval_mode(model):
            left_out = pytree.tree_leaves(model(**given, **consts))
            with_fill = pytree.tree_leaves(model(**given, **{name: filled}, **consts))
    except Exception:  # noqa: BLE001 - a model that cannot leave it out: a call must give it
        return False
    pairs = [(a, b) for a, b in zip(left_out, with_fill) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)]
    return len(left_out) == len(with_fill) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4, equal_nan=True)
        for a, b in pairs)


def refuse_var_positional(model: nn.Module) -> None:
    """forward(self, *xs) given more inputs than it names, or `xs` by name: the graph names every
    input, and what *xs holds has no names (a tuple was told "pass a dict of named inputs", and
    the dict then failed inside export)."""
    params = inspect.signature(model.forward).parameters
    star = next((p.name for p in params.values() if p.kind is p.VAR_POSITIONAL), None)
    # with **kwargs beside it, named inputs reach forward (a dict example works)
    if star is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"{type(model).__name__}.forward{inspect.signature(model.forward)} takes *{star}, and slimfx "
                        "names every input of the graph: wrap the model in a module whose forward names them "
                        "(`def forward(self, a, b): return model(a, b)`) and compile that")


def positional_params(params) -> list[inspect.Parameter]:
    """forward's parameters that can be passed by position, in order (up to a *args)."""
    out = []
    for p in params.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        out.append(p)
    return out


def refuse_nested_tensors(model: nn.Module, consts: dict) -> None:
    """A non-tensor example input (a list or dict) that holds tensors: it would be a constant of
    the graph (or, alone, "no tensor among the example inputs")."""
    nested = next((n for n, v in consts.items()
                   if any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v))), None)
    if nested is not None:
        raise TypeError(f"{type(model).__name__}'s example input {nested} is a {type(consts[nested]).__name__} "
                        "holding tensors: the graph takes tensors one by one (a model whose forward takes a "
                        "list or dict of tensors needs a wrapper whose forward takes them as separate inputs)")


# ---- what capture returns --------------------------------------------------------------------


def check_at_example_sizes(model: nn.Module, program, names, args, consts) -> None:
    """The example had a size of 1 that was traced at 2 (export fixes sizes 0 and 1 as
    constants): where the model computes otherwise at size 1 (`if ids.shape[1] == 1`) the graph
    has only the other branch, with no guard, and its outputs were wrong on the example itself.
    Compared here on the example, against the model; skipped where the forward writes its own
    buffers (running it would change the user's model)."""
    gm = program.module()
    if written_attrs(gm):
        return
    try:
        with torch.no_grad(), eval_mode(model):
            want = [t for t in pytree.tree_leaves(model(**dict(zip(names, args)), **consts))
                    if isinstance(t, torch.Tensor)]
            got = list(gm(*args))
    except Exception:  # noqa: BLE001 - a model that runs only under export: nothing to compare with
        return  # (check_policy says so by name when it calls the original)
    for w, g in zip(want, got):
        if not _close(w, g):
            sizes = ", ".join(f"{n} {list(a.shape)}" for n, a in zip(names, args))
            raise SpecError.at("unsupported", f"{type(model).__name__} computes otherwise at the example's sizes "
                               f"({sizes}) than the graph traced at size 2 in their place (torch.export fixes "
                               "sizes 0 and 1): a branch on a size of 1 in its forward",
                               hint="give example_inputs of at least 2 rows and 2 positions; calls of size 1 "
                                    "then take the graph's branch as well, so compare them with the model once")


def _close(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Same shape, the same inf/NaN in the same places (a masked score of -inf), and the finite
    values within 1e-3 of want's norm (a NaN difference refused a model that outputs -inf)."""
    if want.shape != got.shape:
        return False
    if not want.is_floating_point():
        return torch.equal(want, got)
    w, g = want.float(), got.float()
    finite = w.isfinite()
    if not torch.equal(finite, g.isfinite()) or not torch.equal(w[~finite].nan_to_num(), g[~finite].nan_to_num()):
        return False
    return bool((g[finite] - w[finite]).norm() <= 1e-3 * w[finite].norm() + 1e-5)


def refuse_opaque_outputs(model: nn.Module, consts_out) -> None:
    """An output leaf pytree did not open, holding tensors: kept as a constant, it came back with
    the tracer's fake tensors on every call."""
    opaque = next((c for c in consts_out if _holds_tensors(c)), None)
    if opaque is not None:
        name = type(opaque).__name__
        raise SpecError.at("unsupported", f"{type(model).__name__} returns a `{name}` holding tensors, which slimfx "
                           "cannot take apart: its tensors would come back as the ones seen while tracing",
                           hint=f"register the class with torch.export.register_dataclass({name}) before "
                                "compiling, or return a dict, a tuple or a transformers ModelOutput")


def refuse_symbolic_outputs(model: nn.Module, consts_out) -> None:
    """An output leaf that is a number read from the inputs' sizes (`input_ids.shape[1]`): the
    graph returns tensors alone, so it was kept as the tracer's symbol, returned as `s70` (its
    int() the example's length) on every call, and an artifact with it could not be saved."""
    symbolic = next((c for c in consts_out if isinstance(c, (torch.SymInt, torch.SymFloat, torch.SymBool))), None)
    if symbolic is not None:
        kind = {torch.SymInt: "an int", torch.SymFloat: "a float", torch.SymBool: "a bool"}[type(symbolic)]
        raise SpecError.at("unsupported", f"{type(model).__name__} returns {kind} computed from its inputs' sizes "
                           "(such as `input_ids.shape[1]`), which the compiled graph cannot return per call: it "
                           "returns tensors, and this value would stay the example's",
                           hint="return it as a tensor (`torch.tensor(x.shape[1])`), or leave it out of the output "
                                "and read it from the inputs")


def _holds_tensors(value) -> bool:
    """An output leaf pytree did not open (an unregistered dataclass or object) with tensors in it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    else:
        fields = list(getattr(value, "__dict__", {}).values())
    return any(isinstance(f, torch.Tensor) for f in fields)


def written_attrs(gm: fx.GraphModule) -> list[str]:
    """Targets of the get_attr nodes an op writes in place (`aten.copy_` onto a buffer: the
    unlifted program's form of `self.n += 1`)."""
    out = []
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None:
            continue
        for arg, spec in zip(node.args, schema.arguments):
            if isinstance(arg, fx.Node) and arg.op == "get_attr" and spec.alias_info is not None \
                    and spec.alias_info.is_write:
                out.append(arg.target)
    return list(dict.fromkeys(out))
