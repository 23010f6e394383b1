"""The in-process cache of capture's traces: torch.export takes seconds, and a second compile of
the same model (a policy tried again, a test) needs the same trace.

Two levels:
- per model (weak on the model): the model's own trace, reused while its state is unchanged
  (`state_key`: the identity and version of every tensor, the modules, their attributes, hooks and
  the config). The entry holds the model's tensors (not copies), so it costs nothing beyond the graph.
- across models, where asked for (share_traces(); off by default): a trace does not depend on
  the weights' values (export traces on fake tensors), only on their shapes, dtypes and tying and
  on the code, attributes, class values and config. A model built like one traced before (another
  seed, another checkpoint of the architecture, a weight edit) gets that trace re-bound to its own
  tensors (`portable_key`, `shared`). The trace is kept without any tensor or input of the model
  it came from, in a list bounded by graph nodes (SHARED_NODES), least recently used first out.
  A model holding anything only it has in its key (a tensor attribute, a per-object hook or
  function, a parametrized module) is never shared: it is traced.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from .graph import CallInfo, InputInfo, ModuleInfo, OutputSpec

# model -> {key: CachedTrace}. A weight edit, a swapped module or attribute, a config change or a new
# hook changes _state_key and misses.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# portable key -> CachedTrace whose program holds meta tensors in place of the model's.
_SHARED: "collections.OrderedDict[tuple, CachedTrace]" = collections.OrderedDict()
# The traces kept across models, in graph nodes: a tiny model's graph has a few hundred, a 30-layer
# 135M model's a few thousand (some MB of node metadata each).
SHARED_NODES = 200_000
_STATS = {"hits": 0, "reused": 0, "misses": 0}


@dataclass
class CachedTrace:
    program: Any  # torch.export.ExportedProgram, sharing storage with the model
    modules: dict[str, ModuleInfo]
    inputs: tuple[InputInfo, ...]
    outputs: OutputSpec
    model_class: str
    call: CallInfo


def signature_key(names, args, consts, dims) -> tuple:
    tensors = tuple((n, tuple(a.shape), a.dtype, a.device.type) for n, a in zip(names, args))
    frozen_dims = tuple((n, tuple(sorted(d.items()))) for n, d in dims.items())
    return tensors, repr(sorted(consts.items())), frozen_dims


def state_key(model: nn.Module) -> tuple:
    """Identity and version of every tensor: in-place edits bump `_version`, `.data =` moves the
    pointer, `module.weight = new` changes the id. And what else the traced forward depends on
    (_structure_key): a swapped activation, a changed attention scaling or config, a new hook."""
    return tuple((n, id(t), t._version, t.data_ptr()) for n, t in _tensors(model)), _structure_key(model)


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _structure_key(model: nn.Module) -> tuple:
    """Each module's identity, class, the forward its class has now, attributes and hooks, the
    hooks registered for every module, and the config's values: a change to any of them
    (`layer.mlp.act_fn = nn.ReLU()`, `attn.scaling = 0.01`, `config.output_hidden_states = True`,
    `LlamaMLP.forward = …`) changes what export traces, so it must miss. A patched module-level
    function is not seen."""
    keys = _Keys()
    parts = []
    for name, m in model.named_modules(remove_duplicate=False):
        # a class-level patch (`type(m).forward = f`) keeps the class: key the function it has now
        parts.append((name, id(m), _Same(type(m)), _OfClass(getattr(type(m), "forward", None)), keys.attrs_of(m),
                      _hooks(m)))
    classes = {type(m) for m in model.modules()}
    return tuple(parts), keys.config(getattr(model, "config", None)), keys.class_values(classes), _global_hooks()


def _hooks(m: nn.Module) -> tuple:
    # by identity: a re-registered partial or closure is a new object with other values
    return tuple(_Same(h) for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values())


def _global_hooks() -> tuple:
    """Hooks registered for every module (`register_module_forward_hook`): export traces them
    into every forward, and one registered after a trace was missed by it."""
    from torch.nn.modules import module as torch_module

    return tuple(_Same(h) for d in (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks)
                 for h in d.values())


# What nn.Module keeps for itself (its tensors, children and hooks are keyed apart); `training`
# too: capture traces in eval mode whatever the flag.
_MODULE_SLOTS = frozenset(vars(nn.Module())) | {"training"}
# How deep values are walked inside containers and plain objects; one deeper is never equal.
_DEPTH = 3


def _own_items(m: nn.Module) -> list[tuple[str, Any]]:
    """A module's attributes, private ones too (a value a forward caches in `self._scale`)."""
    return [(k, v) for k, v in sorted(vars(m).items()) if k not in _MODULE_SLOTS]


class _Keys:
    """One state_key's walk over attribute values: plain values and containers of them by value
    (transformers rebuilds some dicts on every call, e.g. `all_tied_weights_keys`), configs by all
    their values, anything else by identity. The config every module holds (transformers gives
    each the model's) is keyed once per walk: to_dict and its JSON per module took half the time
    of SmolLM2's key."""

    def __init__(self):
        self._configs: dict[int, Any] = {}

    def attrs_of(self, m: nn.Module) -> tuple:
        return tuple((k, self.value(v)) for k, v in _own_items(m))

    def class_values(self, classes) -> tuple:
        """Plain values set on the classes (`LlamaAttention.scale = 3.0` changes what a forward
        computes), below nn.Module; functions and descriptors are keyed as the modules' forward is."""
        out = []
        for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__, id(c))):
            for base in cls.__mro__:
                if base in (nn.Module, object):
                    break
                out.extend((base.__qualname__, k, self.value(v)) for k, v in vars(base).items()
                           if not k.startswith("__") and (v is None or isinstance(v, (bool, int, float, str))))
        return tuple(out)

    def config(self, config: Any) -> Any:
        """A Hugging Face config's values (`config.output_hidden_states = True` changes the
        outputs), with its attention implementation, which to_dict() leaves out
        (`set_attn_implementation`); any other config (a dataclass or plain object) as a value."""
        if not callable(getattr(config, "to_dict", None)):
            return None if config is None else self.value(config)
        if id(config) not in self._configs:  # alive for the whole walk: its id is its own
            self._configs[id(config)] = _config_values(config)
        return self._configs[id(config)]

    def value(self, value: Any, depth: int = 0) -> Any:
        """A container nested deeper than _DEPTH is never equal: by identity, an edit inside it
        (`opts["a"]["b"]["c"][0] = 3.0`) kept serving the old trace, so such a model is traced
        every time."""
        if value is None or isinstance(value, (str, bytes)):
            return value
        if isinstance(value, (bool, int, float)):  # by type too: 1 == 1.0 == True, and torch.full tells them apart
            return type(value).__name__, value
        if isinstance(value, torch.Tensor):  # a plain tensor attribute (not a buffer): edits bump its version
            return _Same(value), value._version
        if callable(getattr(value, "to_dict", None)) and not isinstance(value, (type, nn.Module)):
            # a Hugging Face config (each module holds one): by all its values, sub-configs too (a
            # VLM's text_config.rope_parameters lists sat past the depth walked, and never hit)
            return "config", self.config(value)
        contents = _contents(value)
        if contents is None:
            return _Same(value)  # a function or object: its identity (a module's own fields are keyed apart)
        if depth >= _DEPTH:
            return _Never()  # a new one each time: tuples and dicts take an object as equal to itself
        tag, children = contents
        keyed = [(label, self.value(child, depth + 1)) for label, child in children]
        if isinstance(value, (set, frozenset, dict)):  # unordered: by the keys themselves
            keyed.sort(key=repr)
        return tag, tuple(keyed)


def _contents(value: Any) -> tuple[Any, list[tuple[Any, Any]]] | None:
    """What a value is keyed by when it is keyed by what it holds: a tag and its (label, child)
    pairs; None for a value keyed by its identity."""
    if isinstance(value, nn.Module):
        if any(True for _ in value.parameters()) or any(True for _ in value.buffers()):
            return None
        # an unregistered module without tensors (transformers keeps a kernel wrapper per attention
        # in `_kernel_funcs`): by its class, attributes and hooks, as a registered one
        return ("module", _Same(type(value)), _OfClass(getattr(type(value), "forward", None)), _hooks(value)), \
            _own_items(value)
    if isinstance(value, functools.partial):
        # by what it calls with what (gemma2 makes a new `partial(gelu, approximate="tanh")` per
        # module): the same function and arguments compute the same
        return "partial", [("func", value.func), ("args", value.args), ("keywords", value.keywords)]
    if isinstance(value, (tuple, list)):
        return type(value).__name__, list(enumerate(value))
    if isinstance(value, (set, frozenset)):
        return type(value).__name__, [(None, v) for v in value]
    if isinstance(value, dict):
        return "dict", [(repr(k), v) for k, v in value.items()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # by its fields: `config.scale = 3.0` on a dataclass config changes what is traced
        return _Same(type(value)), [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    if _plain_object(value):
        # a SimpleNamespace or hand-written config object: by its fields, as a dataclass
        return _Same(type(value)), sorted(vars(value).items())
    return None


def _plain_object(value: Any) -> bool:
    """An object that holds values and does nothing: not callable (functions, partials and
    modules stay keyed by identity), with a small __dict__ (a tokenizer's vocabulary is not
    walked on every capture)."""
    fields = getattr(value, "__dict__", None)
    return (isinstance(fields, dict) and len(fields) <= 256 and not callable(value)
            and not isinstance(value, (type, nn.Module, torch.Tensor)))


def _config_values(config: Any) -> Any:
    """A config with to_dict() by its values (less where it was loaded from: another checkpoint
    of the architecture computes alike) and its attention implementation."""
    attn = getattr(config, "_attn_implementation", None)
    try:
        values = dict(config.to_dict())
        values.pop("_name_or_path", None)
        return json.dumps(values, sort_keys=True, default=repr), repr(attn)
    except (TypeError, ValueError):  # a config that cannot say its values: key it by identity
        return _Same(config), repr(attn)


class _Same:
    """An object in a cache key by identity. Held weakly where it can be: a hook that closes over
    its model, held by the model's own key, kept the model alive for good (the weak cache's
    value held its key). A freed object never matches again, so a new object that takes its id
    does not hit (a freed hook's id was reused by the next one, and hit)."""

    __slots__ = ("_ref", "_id")

    def __init__(self, obj: Any):
        try:
            self._ref = weakref.ref(obj)
        except TypeError:  # None, a builtin: held as it is (such objects are not the model's own)
            self._ref = lambda: obj
        self._id = id(obj)

    @property
    def obj(self) -> Any:
        return self._ref()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same) or self._id != other._id:
            return False
        mine = self._ref()
        return mine is not None and mine is other._ref()

    def __hash__(self) -> int:
        return self._id


class _OfClass(_Same):
    """A class's own function (its forward): shared by every model that has the class."""

    __slots__ = ()


class _Never:
    """In a key, equal to nothing (itself included): what cannot be compared safely misses."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return 0


# ---- per model ------------------------------------------------------------------------------


def lookup(model: nn.Module, key: tuple) -> CachedTrace | None:
    entry = _CACHE.get(model, {}).get(key)
    if entry is not None:
        _STATS["hits"] += 1
    return entry


def store(model: nn.Module, key: tuple, entry: CachedTrace) -> None:
    # Entries for an older state hold tensors the model no longer has: drop them.
    kept = {k: e for k, e in _CACHE.get(model, {}).items() if k[1] == key[1]}
    kept[key] = entry
    _CACHE[model] = kept


# ---- across models --------------------------------------------------------------------------


class _NotPortable(Exception):
    """The model's key holds an object only this model has: its trace is not shared."""


def share_traces(on: bool = True) -> bool:
    """Reuse a trace across models built alike (off by default); returns the previous setting.
    Worth it where one process compiles many fresh models of one architecture (a sweep over
    checkpoints, a test suite): each skips torch.export's seconds. The one thing a shared trace
    does not see, as this model's own cached trace does not either, is a patched module-level
    function (`modeling_llama.apply_rotary_pos_emb = …`) after the first trace: clear_cache() then."""
    global _SHARING
    before, _SHARING = _SHARING, bool(on)
    if not on:
        _SHARED.clear()
    return before


_SHARING = False


def portable_key(model: nn.Module, signature: tuple, state: tuple) -> tuple | None:
    """What a trace of `model` (whose state_key is `state`) on inputs of `signature` depends on,
    with nothing that names this model object: each tensor's kind, shape, strides, dtype, device and which others it is tied to
    (by object and by storage); each module's path, class, forward, attributes and hooks, a module
    used under two paths by its first path's number; the config's values. None when the model has
    an object in its key that is its own (a tensor attribute, a closure as hook or attribute), a
    parametrized module (its class is its own: parametrize makes one per module), or sharing is off."""
    if not _SHARING or any(parametrize.is_parametrized(m) for m in model.modules()):
        return None
    objects: dict[int, int] = {}
    storages: dict[int, int] = {}
    tensors = []
    for name, t in _tensors(model):
        if type(t) not in (torch.Tensor, nn.Parameter):  # a tensor subclass: export may read its insides
            return None
        tensors.append((name, isinstance(t, nn.Parameter), t.requires_grad, tuple(t.shape), t.stride(),
                        t.storage_offset(), t.dtype, str(t.device), objects.setdefault(id(t), len(objects)),
                        storages.setdefault(t.untyped_storage().data_ptr(), len(storages))))
    modules: dict[int, int] = {}
    parts, config, class_values, global_hooks = state[1]  # state_key(model)'s structure, made once by the caller
    try:
        portable = tuple((name, modules.setdefault(ident, len(modules)), *map(_shared_only, rest))
                         for name, ident, *rest in parts)
        return (signature, tuple(tensors), portable, _shared_only(config), _shared_only(class_values),
                _shared_only(global_hooks))
    except _NotPortable:
        return None


def _shared_only(part: Any) -> Any:
    """`part` as it is, after checking that every object it holds by identity is one any model
    would hold: a class or its forward, a module-level function or None. Raises _NotPortable
    otherwise."""
    if isinstance(part, _Never):  # never equal: kept, it would only fill the list
        raise _NotPortable
    if isinstance(part, _Same):
        if not isinstance(part, _OfClass) and not isinstance(part.obj, type) and not _module_level(part.obj):
            raise _NotPortable
    elif isinstance(part, tuple):
        for p in part:
            _shared_only(p)
    return part


def _module_level(obj: Any) -> bool:
    if obj is None:
        return True
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    qualname = getattr(obj, "__qualname__", None)
    if module is None or not isinstance(qualname, str) or "<locals>" in qualname:
        return False
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


def shared(key: tuple | None, model: nn.Module) -> CachedTrace | None:
    """The trace kept for a model built like `model`, re-bound to `model`'s tensors (its module
    table and call are the caller's to fill in), or None."""
    entry = _SHARED.get(key) if key is not None else None
    program = _rebound(entry.program, model) if entry is not None else None
    if program is None:
        return None
    _SHARED.move_to_end(key)
    _STATS["reused"] += 1
    return dataclasses.replace(entry, program=program)


def remember(key: tuple | None, entry: CachedTrace, model: nn.Module) -> None:
    """A fresh trace of `model`: count it, and keep it for models built like `model`, without
    `model`'s tensors."""
    _STATS["misses"] += 1
    if key is None or not _rebindable(entry.program):
        return
    own = {id(t) for _, t in _tensors(model)}
    meta = {k: _on_meta(v) if id(v) in own else v for k, v in _program_tensors(entry.program).items()}
    kept = _with_tensors(entry.program, meta)
    # the example inputs give the graph's input structure only: not the user's tensors themselves
    kept._example_inputs = pytree.tree_map_only(torch.Tensor, _on_meta, kept._example_inputs)
    _SHARED[key] = dataclasses.replace(entry, program=kept)
    _SHARED.move_to_end(key)
    while len(_SHARED) > 1 and sum(len(e.program.graph.nodes) for e in _SHARED.values()) > SHARED_NODES:
        _SHARED.popitem(last=False)


def _rebound(program: Any, model: nn.Module) -> Any:
    """A copy of a kept program whose parameters and buffers are `model`'s own, by name (the
    trace's lifted constants, made by the forward itself, are the kept ones). None where a kept
    tensor has no namesake in `model` (the keys matched, so it should not happen: trace instead)."""
    own = dict(_tensors(model))
    tensors = {k: own.get(k, v) for k, v in _program_tensors(program).items()}
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors.values()):
        return None
    return _with_tensors(program, tensors)


def _rebindable(program: Any) -> bool:
    # ExportedProgram keeps its tensors in these two dicts and its example inputs in the third in
    # every torch this runs on (2.5-2.13); a torch that does not is traced every time instead.
    return (isinstance(getattr(program, "_state_dict", None), dict)
            and isinstance(getattr(program, "_constants", None), dict) and hasattr(program, "_example_inputs"))


def _program_tensors(program: Any) -> dict[str, Any]:
    return {**program._constants, **program._state_dict}


def _with_tensors(program: Any, tensors: dict[str, Any]) -> Any:
    out = copy.copy(program)
    out._state_dict = {k: tensors[k] for k in program._state_dict}
    out._constants = {k: tensors[k] for k in program._constants}
    return out


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    empty = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty


def clear_cache() -> None:
    """Forget every trace (not the share_traces setting)."""
    _CACHE.clear()
    _SHARED.clear()
    _STATS.update(hits=0, reused=0, misses=0)


def cache_info() -> dict[str, int]:
    """Since the last clear_cache(): {"hits": the model's own trace reused, "reused": the trace
    of a model built like it re-bound to its tensors, "misses": traced by torch.export,
    "models": models with a trace kept, "shared": traces kept across models}."""
    return dict(_STATS, models=len(_CACHE), shared=len(_SHARED))
