"""Capture: model + example inputs -> ModelGraph, the first stage of the pipeline.

`torch.export.export(strict=False)` with dynamic batch/sequence dims traces the model to an aten
graph; the graph gets its own copy of every weight, so no later pass can touch the user's model, or
(`lend=True`, compile()'s way) reads the model's own tensors until compile() settles (lent.py).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

import sympy
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..dsl.errors import SpecError
from ..runtime.program import NOT_JSON, config_positions, flag_json
from . import autocast_regions
from .capture_cache import (CachedTrace, lookup, portable_key, remember, shared, signature_key, state_key,
                            store)
from .capture_checks import (check_at_example_sizes, check_names, positional_params, unfillable_inputs,
                             refuse_nested_tensors,
                             refuse_opaque_outputs, refuse_var_positional, refuse_symbolic_outputs, written_attrs)
from .eval_mode import eval_mode
from .graph import CallInfo, InputInfo, ModelGraph, ModuleInfo, OutputSpec, ParamInfo
from .lent import lend as lend_tensors, own_copies
from .linear_form import matmuls_as_linears

__all__ = ["capture", "bind_inputs", "SEQ_INPUTS"]

# Inputs whose dim 1 is the sequence; any other 2-D integer/bool input (a mask) counts too.
SEQ_INPUTS = frozenset({
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
    "decoder_input_ids", "decoder_attention_mask", "labels", "head_mask",
})


def capture(model: nn.Module, example_inputs: Mapping[str, Any] | tuple,
            *, dynamic: Mapping[str, Mapping[int, str]] | None = None, lend: bool = False) -> ModelGraph:
    """Trace `model` on `example_inputs` into a ModelGraph whose weights are copies, or with
    `lend=True` new tensor objects over the model's own storage (`graph.lent` says which; see
    lent.py: no pass may then write a weight in place, and `graph.lent.settle` ends the loan).

    >>> g = capture(llama, {"input_ids": ids, "attention_mask": mask})
    >>> ids2, mask2 = ids[:1, :5], mask[:1, :5]
    >>> g(input_ids=ids2, attention_mask=mask2).logits.shape       # any batch / seq; a ModelOutput
    torch.Size([1, 5, 256])
    >>> torch.equal(g.restructure(g.module(ids2, mask2)).logits,   # the same, from the flat graph
    ...             g(input_ids=ids2, attention_mask=mask2).logits)
    True

    A second call with the same model, input names/shapes/dtypes and unchanged weights reuses
    the cached export (only the weight copy and the index are redone); after
    `capture_cache.share_traces()`, a model built like one traced before (same code, attributes,
    config, shapes and tying; any weights) reuses that trace over its own tensors.

    `dynamic` overrides which dims are symbolic: {"input_ids": {0: "batch", 1: "seq"}}.
    Sizes 0/1 in the example are widened to 2 for tracing (export would specialize them).
    The model is traced in eval mode; its training flags are restored afterwards.
    """
    names, args, consts = bind_inputs(model, example_inputs)
    dims = {n: dict(dynamic[n]) if dynamic and n in dynamic else _default_dims(n, a)
            for n, a in zip(names, args)}
    signature, state = signature_key(names, args, consts, dims), state_key(model)
    entry = lookup(model, (signature, state))
    if entry is None:
        portable = portable_key(model, signature, state)
        entry = shared(portable, model)
        if entry is not None:  # the trace of a model built like this one, over this one's tensors
            entry = dataclasses.replace(entry, modules=_module_table(model), model_class=type(model).__name__,
                                        call=_call_info(model, names, consts))
        else:
            entry = _export(model, names, args, consts, dims)
            remember(portable, entry, model)
            # keyed by the state after tracing: transformers installs its output-recording hooks then
            state = state_key(model)
        store(model, (signature, state), entry)
    return _graph_from(entry, lend)


# ---- inputs --------------------------------------------------------------------------------


def bind_inputs(model: nn.Module, example: Mapping[str, Any] | tuple):
    """(input names, tensor values, non-tensor keyword constants) in call order. A dict names
    the inputs; a tuple (or a bare tensor: the first input, not rows) binds by position."""
    if isinstance(example, torch.Tensor):
        example = (example,)
    if isinstance(example, Mapping):
        items = list(example.items())
    else:
        params = positional_names(model)
        if len(params) < len(example):
            refuse_var_positional(model)
            raise TypeError(f"{type(model).__name__}.forward takes {len(params)} positional "
                            f"inputs; {len(example)} were given: pass a dict of named inputs")
        items = list(zip(params, example))
    check_names(model, [n for n, _ in items])
    tensors = [(n, v) for n, v in items if isinstance(v, torch.Tensor)]
    consts = {n: v for n, v in items if not isinstance(v, torch.Tensor)}
    refuse_nested_tensors(model, consts)
    if not tensors:
        raise TypeError(f"no tensor among the example inputs of {type(model).__name__}")
    if "use_cache" in inspect.signature(model.forward).parameters:
        consts.setdefault("use_cache", False)  # a KV cache output would not be a flat tensor
    return [n for n, _ in tensors], [v for _, v in tensors], consts


def positional_names(model: nn.Module) -> tuple[str, ...]:
    """forward's parameters that can be passed by position, in order (up to a *args)."""
    return tuple(p.name for p in positional_params(inspect.signature(model.forward).parameters))


def _default_dims(name: str, value: torch.Tensor) -> dict[int, str]:
    """Dim 0 is the batch; dim 1 the sequence for token-shaped inputs (ids, masks, embeds)."""
    if value.dim() == 0:
        return {}
    dims = {0: "batch"}
    token_like = value.dim() == 2 and not value.is_floating_point()
    if value.dim() == 4 and name.endswith("attention_mask"):  # [batch, 1 or heads, seq or 1, seq]: a model's own
        # mask; dim 1 doubled to 2 beside a broadcast head dim failed export, blamed on the model
        dims.update({d: "seq" for d in (2, 3) if value.shape[d] > 1})  # a query dim of 1 broadcasts
    elif value.dim() >= 2 and (name in SEQ_INPUTS or token_like):
        dims[1] = "seq"
    return dims


def _widen(value: torch.Tensor, dims: Mapping[int, str]) -> torch.Tensor:
    """Repeat dims of size 1 to size 2: export specializes 0/1-sized dims to constants."""
    for d in dims:
        if value.shape[d] == 1:
            value = torch.cat([value, value], dim=d)
    return value


# ---- export --------------------------------------------------------------------------------


class _FlatCall(nn.Module):
    """Calls the model with named inputs and returns its output leaves as a flat tuple.

    It shares the model's child/parameter/buffer dicts instead of owning the model, so names in
    the exported program are the model's own (`model.layers.0.mlp.up_proj.weight`).
    """

    def __init__(self, model: nn.Module, names: list[str], consts: dict[str, Any], sink: list):
        super().__init__()
        self._modules, self._parameters, self._buffers = (
            model._modules, model._parameters, model._buffers)
        object.__setattr__(self, "_target", model)  # not a child: no `_target.` name prefix
        self._names, self._consts, self._sink = names, consts, sink
        # forward(self, x, /): such a parameter cannot be passed by name ("positional-only
        # arguments passed as keyword arguments", blamed on torch.export)
        self._by_position = [p for p in inspect.signature(model.forward).parameters.values()
                             if p.kind is p.POSITIONAL_ONLY]

    def forward(self, *args):
        named = {**dict(zip(self._names, args)), **self._consts}
        first = []
        for p in self._by_position:  # in order; a left-out one takes its default, if it has one
            if p.name not in named and p.default is p.empty:
                break
            first.append(named.pop(p.name, p.default))
        out = self._target(*first, **named)
        leaves, spec = pytree.tree_flatten(out)
        # Export restores attributes set during tracing, so the spec leaves through a list.
        self._sink.append((spec, [None if isinstance(x, torch.Tensor) else x for x in leaves],
                           [isinstance(x, torch.Tensor) for x in leaves]))
        return tuple(x for x in leaves if isinstance(x, torch.Tensor))


def _export(model, names, args, consts, dims) -> CachedTrace:
    sink: list = []
    wrapper = _FlatCall(model, names, consts, sink)
    # torch.export names the placeholders after forward's parameters.
    P = inspect.Parameter
    sig = inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD) for n in names])
    wrapper.forward = _with_signature(wrapper.forward, sig)
    shapes = {n: {d: torch.export.Dim.AUTO for d in dims[n]} or None for n in names}
    traced = tuple(_widen(a, dims[n]) for n, a in zip(names, _unaliased(args)))
    try:
        with torch.no_grad(), eval_mode(model), autocast_regions.recording():
            program = torch.export.export(wrapper, traced, dynamic_shapes=shapes, strict=False)
        autocast_regions.inline(program.graph_module)
    except Exception as e:  # export raises many types; the user needs one, with the cause
        raise _unsupported(model, e) from e
    spec, consts_out, tensor_leaves = sink[-1]
    if any(t.shape != a.shape for t, a in zip(traced, args)):
        check_at_example_sizes(model, program, names, args, consts)
    refuse_opaque_outputs(model, consts_out)
    refuse_symbolic_outputs(model, consts_out)
    unfilled = unfillable_inputs(model, program, names, args, consts)
    return CachedTrace(program, _module_table(model), _input_infos(program, names, dims, unfilled),
                  OutputSpec(spec, tuple(consts_out), tuple(tensor_leaves)), type(model).__name__,
                  _call_info(model, names, consts))


def _call_info(model: nn.Module, names, consts) -> CallInfo:
    return CallInfo(positional_names(model), tuple(consts.items()), _flag_defaults(model, names, consts),
                    _declared_defaults(model, consts), config_positions(getattr(model, "config", None)))


# Hugging Face flags a forward takes through **kwargs (or as None): None means the config's value.
_HF_FLAGS = ("return_dict", "output_hidden_states", "output_attentions", "output_router_logits")


def _flag_defaults(model: nn.Module, names, consts) -> tuple[tuple[str, Any], ...]:
    """The value each keyword flag the example left out had in the capture: its default in
    forward's signature, or for HF's flags taken as None (or through **kwargs) the config's. A call
    repeating it gets the graph's own output (`return_dict=True` on a model that returns a
    ModelOutput was refused). A forward's own default decides over the config's (DPR's encoders
    declare return_dict=False beside a config that says True)."""
    config = getattr(model, "config", None)
    try:
        params = dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a forward without a signature: no defaults to repeat
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {}
    for p in params.values():
        if p.default is not p.empty and p.default is not None and _is_scalar(p.default):
            out[p.name] = p.default
    for name in _HF_FLAGS:
        declared = params.get(name)
        if declared is None and not takes_any:  # the forward does not take it: a call passing it fails there
            continue
        if declared is not None and declared.default is not None:  # its own default (or required)
            continue
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, bool):
            out[name] = value
    return tuple((k, v) for k, v in out.items() if k not in names and k not in consts)


def _declared_defaults(model: nn.Module, consts) -> tuple[tuple[str, Any], ...]:
    """What a call that leaves out a flag the example set means, where the graph computes
    otherwise (not use_cache, which capture sets itself): forward's own scalar default, or for
    HF's None-for-the-config flags the config's value — `return_dict=False` in the example, and
    a call without it got a tuple where the model returns a ModelOutput, silently."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return ()
    left_out = dict(_flag_defaults(model, (), {}))  # what each flag is when a call leaves it out
    out = []
    for name, value in consts.items():
        p = params.get(name)
        if p is not None and p.default is not p.empty and p.default is not None and _is_scalar(p.default):
            default = p.default
        elif name in _HF_FLAGS and name in left_out:
            default = left_out[name]
        else:
            continue
        if name != "use_cache" and _is_scalar(value) and (type(value), value) != (type(default), default):
            out.append((name, default))
    return tuple(out)


def _is_scalar(value: Any) -> bool:
    """A flag value a call can repeat and an artifact can store: a number or text, or a tuple or
    list of them (`dims=(0, 1)`; a call leaving such a flag out ran the captured value silently)."""
    return value is not None and flag_json(value) is not NOT_JSON


def _unaliased(args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each example input on its own storage. torch.export merges inputs that are one tensor
    (`{**x, "labels": x["input_ids"]}`, the usual HF idiom) into one placeholder: the graph's
    embedding then read `labels`, and every call computed its logits from the labels given. And
    none a view: export guards a view's base (`L['input_ids']._base.size()[1] != …`), and every
    call with a plain tensor failed on it (`x[:, :8]` as the example: "'NoneType' object has no
    attribute 'size'"), the cached trace too."""
    seen: set[int] = set()
    out = []
    for a in args:
        ptr = a.untyped_storage().data_ptr()
        own = (ptr in seen and a.numel()) or a._is_view() or not a.is_contiguous()
        out.append(a.clone(memory_format=torch.contiguous_format) if own else a)
        seen.add(ptr)
    return out


def _with_signature(bound, sig: inspect.Signature):
    """A per-instance forward with an explicit signature (the class stays generic)."""
    def forward(*args):
        return bound(*args)
    forward.__signature__ = sig
    return forward


def _unsupported(model: nn.Module, e: Exception) -> SpecError:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return SpecError.at(
        "unsupported",
        f"cannot capture {type(model).__name__}: torch.export failed with "
        f"{type(e).__name__}: {first}",
        hint="slimfx needs a model that torch.export.export(strict=False) can trace; "
             "the full cause is chained below this error")


# ---- what the graph keeps about the model -----------------------------------------------------


def _module_table(model: nn.Module) -> dict[str, ModuleInfo]:
    """Structure, classes and parameter shapes of every module: metadata only, no tensors."""
    storage: dict[int, int] = {}
    table = {}
    # Every path of a module used twice (`layers = ModuleList([blk, blk, …])`): export names its
    # calls by path, and a de-duplicated table lacked `layers.1` (a KeyError in select) or
    # shifted indices. Storage numbers tie the paths' weights together.
    for path, mod in model.named_modules(remove_duplicate=False):
        own = [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
        params = tuple(
            ParamInfo(_join(path, n), tuple(t.shape), str(t.dtype).replace("torch.", ""),
                      t.numel() * t.element_size(), storage.setdefault(id(t), len(storage)),
                      is_buffer=not isinstance(t, nn.Parameter))
            for n, t in own if t is not None)
        table[path] = ModuleInfo(
            path=path, cls=type(mod).__name__,
            classes=tuple(c.__name__ for c in type(mod).__mro__),
            children=tuple(n for n, m in mod._modules.items() if m is not None),
            is_list=isinstance(mod, (nn.ModuleList, nn.Sequential)), params=params)
    return table


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _input_infos(program, names, dims, unfilled: set[str]) -> tuple[InputInfo, ...]:
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    # the most each dim's symbol may be, where export found a bound (a table of positions)
    uppers = {str(k): int(v.upper) for k, v in program.range_constraints.items() if isinstance(v.upper, sympy.Integer)}
    infos = []
    for name, placeholder in zip(names, program.graph_signature.user_inputs):
        val = vals[placeholder]
        sizes = tuple(s if isinstance(s, int) else str(s) for s in val.shape)
        limits = {d: uppers[s] for d, s in enumerate(sizes) if isinstance(s, str) and s in uppers}
        infos.append(InputInfo(name, sizes, val.dtype, dict(dims[name]), fill=name not in unfilled, limits=limits))
    return tuple(infos)


def _graph_from(entry: CachedTrace, lend: bool) -> ModelGraph:
    """A fresh GraphModule per call, with its own copies of the weights (tying preserved), or
    lent ones."""
    gm = entry.program.module()
    matmuls_as_linears(gm)
    lent = lend_tensors(gm) if lend else None
    if lend:
        # A buffer the forward writes (a call counter, running statistics) is the graph's own from
        # the start: lent, the first calibration forward wrote into the user's model
        lent.own_written(gm, written_attrs(gm))
    else:
        own_copies(gm)
    # The module table is copied too: a pass may edit its graph's table, never the cache's.
    graph = ModelGraph(gm, dict(entry.modules), entry.inputs, entry.outputs, entry.model_class,
                       entry.call)
    graph.lent = lent
    return graph
