"""A compiled GraphModule as slimfx's own JSON graph (program.json) and back, no torch.export.

    {"format": "slimfx-graph", "symbols": {"s0": 2, "s1": 8, ...},   # size symbols: hints
     "modules": ["model", "model.layers", ...],                       # submodules, in order
     "tensors": [{"path": "model.norm.weight", "kind": "parameter",   # or buffer / constant
                  "data": "model.norm.weight", "requires_grad": true}, ...],
     "nodes": [{"op": "call_function", "name": "add", "target": "aten.add.Tensor",
                "args": [{"node": "x"}, 1.0], "kwargs": {}, "val": {"tensor": [...]},
                "meta": {"nn_module_stack": {...}}}, ...]}

Arguments are JSON scalars, [tuples], {"list": [...]}, {"node": name}, {"dtype": "float32"},
{"device": "cpu"}, {"layout": "strided"}, {"memory_format": "contiguous_format"} and
{"float": "inf"}. Saving refuses anything else; loading resolves every target through
runtime/program_check.py and builds the fx graph node by node, values included
(runtime/graph_io_values.py): nothing is imported, evaluated or unpickled.
"""
from __future__ import annotations

import contextlib
import gc
import math
from typing import Any

import torch
from torch import fx, nn

from .artifact_errors import PROGRAM, RESAVE, WEIGHTS, ArtifactError
from .masters import as_declared
from .graph_io_values import NOT_STORED, SymbolNames, ValueDecoder, device_named, dtype_named, encode_val
from .program_check import check_name, check_path, load_refuses, op_name, refused, resolve_target

__all__ = ["encode_graph", "decode_graph", "GRAPH_FORMAT"]

GRAPH_FORMAT = "slimfx-graph"
_DROPPED_MODULES = ("_guards_fn",)  # export's guard checker: Python code, never stored
_KEPT_META = ("nn_module_stack", "source_fn_stack", "torch_fn", "custom")
_LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values()
            if isinstance(v, torch.layout)}
_MEMORY_FORMATS = {str(v).removeprefix("torch."): v for v in vars(torch).values()
                   if isinstance(v, torch.memory_format)}


@contextlib.contextmanager
def _no_gc():
    """Thousands of small objects are made at once: cyclic collections in between would cost
    a third of the time and free nothing."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


# ---- save -----------------------------------------------------------------------------------


def encode_graph(gm: fx.GraphModule, what: str) -> tuple[dict, dict[str, torch.Tensor],
                                                         dict[str, str]]:
    """(program.json document, tensors to store by name, alias path -> stored name)."""
    with _no_gc():
        return _encode_graph(gm, what)


def _encode_graph(gm: fx.GraphModule, what: str):
    kept = [n for n in gm.graph.nodes
            if not (n.op == "call_module" and n.target in _DROPPED_MODULES and not n.users)]
    names = SymbolNames([n.meta.get("val") for n in kept])
    nodes = [_encode_node(n, what, names) for n in kept]
    tensors, aliases, records = _encode_tensors(gm, what)
    modules = [p for p, _ in gm.named_modules() if p and p.split(".")[0] not in _DROPPED_MODULES]
    doc = {"format": GRAPH_FORMAT, "symbols": names.table, "modules": modules,
           "tensors": records, "nodes": nodes}
    return doc, tensors, aliases


def _encode_node(n: fx.Node, what: str, names: SymbolNames) -> dict:
    rec: dict[str, Any] = {"op": n.op, "name": n.name}
    if n.op == "call_function":
        name = op_name(n.target)
        if name is None:
            raise ArtifactError(
                f"cannot save {what}: node {n.name} calls {_callable_name(n.target)}, which is "
                "not an aten, prims or slimfx operator; an artifact stores only operators that "
                "load() can look up by name (register the function as a torch custom op under "
                "the slimfx namespace, or lower it to aten first)")
        outside = load_refuses(n.target)
        if outside:
            raise ArtifactError(
                f"cannot save {what}: node {n.name} calls {name}, which {outside}; load() refuses such "
                "operators (an artifact must not reach files or storages), so the artifact could not be "
                "loaded: write the model without that call (a numeric argument where it takes text), or "
                "keep the compiled model in memory")
        rec["target"] = name
    elif n.op in ("placeholder", "get_attr"):
        rec["target"] = n.target
    elif n.op != "output":
        raise ArtifactError(f"cannot save {what}: node {n.name} is a {n.op} of {n.target}; "
                            "artifacts store flat graphs of operators (inline submodules)")
    rec["args"] = _arg(n.args, n, what)
    rec["kwargs"] = {k: _arg(v, n, what) for k, v in n.kwargs.items()}
    if "val" in n.meta:
        val = encode_val(n.meta["val"], names)
        if val is not NOT_STORED:
            rec["val"] = val
    meta = {k: _plain(n.meta[k]) for k in _KEPT_META if k in n.meta}
    meta = {k: v for k, v in meta.items() if v is not NOT_STORED}
    if meta:
        rec["meta"] = meta
    return rec


def _callable_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', fn)}"


def _arg(a: Any, n: fx.Node, what: str) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):
        return [_arg(x, n, what) for x in a]
    if isinstance(a, list):
        return {"list": [_arg(x, n, what) for x in a]}
    if isinstance(a, dict) and all(isinstance(k, str) for k in a):
        return {"dict": {k: _arg(v, n, what) for k, v in a.items()}}
    for kind, cls in (("dtype", torch.dtype), ("device", torch.device),
                      ("layout", torch.layout), ("memory_format", torch.memory_format)):
        if isinstance(a, cls):
            return {kind: str(a).removeprefix("torch.")}
    raise ArtifactError(f"cannot save {what}: node {n.name} ({n.format_node()[:120]}) has an "
                        f"argument of type {type(a).__name__}, which artifacts cannot store")


def _plain(v: Any) -> Any:
    """Node metadata as JSON: strings, numbers, lists, dicts; classes by their full name."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else NOT_STORED
    if isinstance(v, type):
        return f"{v.__module__}.{v.__qualname__}"
    if isinstance(v, (list, tuple)):
        items = [_plain(x) for x in v]
        return NOT_STORED if any(x is NOT_STORED for x in items) else items
    if isinstance(v, dict):
        items = {str(k): _plain(x) for k, x in v.items()}
        return NOT_STORED if any(x is NOT_STORED for x in items.values()) else items
    return NOT_STORED


def _encode_tensors(gm: nn.Module, what: str):
    """Every parameter, buffer and plain tensor attribute; each distinct tensor stored once."""
    owned: list[tuple[str, torch.Tensor, dict]] = []
    declared: dict[int, torch.Tensor] = {}  # one rounded copy of a master under every name it has
    for path, mod in gm.named_modules(remove_duplicate=False):
        if path.split(".")[0] in _DROPPED_MODULES:
            continue
        prefix = f"{path}." if path else ""
        for name, p in mod._parameters.items():
            if p is not None:  # a half adapter training on a float32 master is stored as declared
                if id(p) not in declared:
                    declared[id(p)] = as_declared(p)
                owned.append((prefix + name, declared[id(p)], {"kind": "parameter",
                                                               "requires_grad": p.requires_grad}))
        for name, b in mod._buffers.items():
            if b is not None:
                owned.append((prefix + name, b, {"kind": "buffer", "persistent":
                                                 name not in mod._non_persistent_buffers_set}))
        for name, v in vars(mod).items():
            if isinstance(v, torch.Tensor) and not name.startswith("__"):
                owned.append((prefix + name, v, {"kind": "constant"}))
    params = [(p, t, r) for p, t, r in owned if r["kind"] == "parameter"]
    owned = params + [x for x in owned if x[2]["kind"] != "parameter"]
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    records = []
    for path, t, rec in owned:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[path] = seen[key]
        else:
            seen[key] = path
            ptr = t.untyped_storage().data_ptr()
            data = t.detach().cpu()
            # safetensors refuses tensors that share memory: copy partial views of one storage
            tensors[path] = data.clone() if ptr in storages and t.numel() else data.contiguous()
            storages.add(ptr)
        records.append({"path": path, "data": aliases.get(path, path), **rec})
    return tensors, aliases, records


# ---- load -----------------------------------------------------------------------------------


def decode_graph(doc: Any, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The GraphModule program.json describes, over `tensors` (from weights.safetensors)."""
    with _no_gc():
        return _decode_graph(doc, tensors)


def _decode_graph(doc: Any, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    if not isinstance(doc, dict) or doc.get("format") != GRAPH_FORMAT:
        raise ArtifactError(f"{PROGRAM} is not a slimfx graph; {RESAVE}")
    where = "its symbol table"
    try:
        values = ValueDecoder(doc.get("symbols"))
        where = "its module table"
        gm = _module_tree(doc["modules"], doc["tensors"], tensors)
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        for i, rec in enumerate(doc["nodes"]):
            where = f"node {i}"
            _decode_node(rec, graph, env, values, gm)
        if not any(n.op == "output" for n in graph.nodes):
            raise ValueError("the graph has no output node")
        where = "the graph"
        graph.lint()
        gm.graph = graph  # fx generates forward()'s source from the checked names
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise ArtifactError(f"{PROGRAM} is malformed at {where} ({type(e).__name__}: "
                            f"{str(e)[:200]}); {RESAVE}") from e
    return gm


def _module_tree(modules: list, records: list, stored: dict[str, torch.Tensor]) -> fx.GraphModule:
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    for path in modules:
        owner, _, name = check_path(path, "module path").rpartition(".")
        parent = gm.get_submodule(owner)
        if name in parent._modules or hasattr(parent, name):
            raise ValueError(f"module {path} is listed twice or shadows an attribute")
        parent.add_module(name, nn.Module())
    wanted = {str(rec["data"]) for rec in records}
    missing, extra = sorted(wanted - set(stored)), sorted(set(stored) - wanted)
    if missing or extra:
        raise ArtifactError(f"{WEIGHTS} does not hold the program's tensors (missing "
                            f"{missing[:5]}, unexpected {extra[:5]}); {RESAVE}")
    params: dict[str, nn.Parameter] = {}
    for rec in records:
        path, data, kind = check_path(rec["path"], "tensor path"), rec["data"], rec["kind"]
        owner, _, name = path.rpartition(".")
        mod = gm.get_submodule(owner)
        if name in mod._parameters or name in mod._buffers or hasattr(mod, name):
            raise ValueError(f"tensor {path} is listed twice or shadows an attribute")
        t = stored[data]
        if kind == "parameter":  # one Parameter per stored tensor keeps tied weights tied
            if data not in params:
                params[data] = nn.Parameter(t, requires_grad=bool(rec["requires_grad"]))
            mod.register_parameter(name, params[data])
        elif kind == "buffer":
            mod.register_buffer(name, t, persistent=bool(rec["persistent"]))
        elif kind == "constant":
            setattr(mod, name, t)
        else:
            raise ValueError(f"tensor {path} is of kind {str(kind)[:40]!r}")
    return gm


def _decode_node(rec: dict, graph: fx.Graph, env: dict[str, fx.Node], values: ValueDecoder,
                 gm: fx.GraphModule) -> None:
    op = rec["op"]
    name = check_name(rec["name"])
    if name in env:
        raise ValueError(f"node name {name} is used twice")
    args = _decode_arg(rec.get("args", []), env, 0)
    kwargs = {check_name(k, "keyword"): _decode_arg(v, env, 0)
              for k, v in rec.get("kwargs", {}).items()}
    if not isinstance(args, tuple):
        raise ValueError("args is not a list")
    if op == "call_function":
        target = resolve_target(rec["target"])
    elif op == "placeholder":
        target = check_name(rec["target"], "input name")
    elif op == "get_attr":
        target = check_path(rec["target"], "get_attr target")
        try:
            _lookup(gm, target)
        except AttributeError as e:
            raise ValueError(f"get_attr {target} names no tensor of the module") from e
    elif op == "output":
        target = "output"
    else:
        raise refused(f"node {name} is a {str(op)[:40]!r} node; only placeholder, get_attr, "
                      "call_function and output nodes are loaded")
    node = graph.create_node(op, target, args, kwargs, name=name)
    env[name] = node
    if "val" in rec:
        node.meta["val"] = values.decode(rec["val"])
        if op == "get_attr":
            _check_stored(target, _lookup(gm, target), node.meta["val"])
    elif op == "call_function" and isinstance(target, torch._ops.OpOverload) \
            and not target._schema.returns:
        node.meta["val"] = None
    meta = rec.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError("meta is not an object")
    for key in _KEPT_META:
        if key in meta:
            node.meta[key] = _restore_meta(key, meta[key])


def _lookup(gm: nn.Module, path: str) -> torch.Tensor:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise AttributeError(path)
    return obj


def _check_stored(path: str, t: torch.Tensor, val: Any) -> None:
    """A stored tensor has the dtype and (static) shape the graph was traced with."""
    if not isinstance(val, torch.Tensor) or not all(type(s) is int for s in val.shape):
        return
    if tuple(t.shape) != tuple(val.shape) or t.dtype != val.dtype:
        raise ArtifactError(f"tensor {path!r} in {WEIGHTS} is {t.dtype} {tuple(t.shape)} but "
                            f"the program expects {val.dtype} {tuple(val.shape)}; {RESAVE}")


def _restore_meta(key: str, v: Any) -> Any:
    if key == "nn_module_stack":  # {key: (path, class name)}, as torch.export writes it
        return {str(k): tuple(e) if isinstance(e, list) else e for k, e in v.items()}
    if key == "source_fn_stack":
        return [tuple(e) if isinstance(e, list) else e for e in v]
    if key == "torch_fn":
        return tuple(v) if isinstance(v, list) else v
    return v


def _decode_arg(a: Any, env: dict[str, fx.Node], depth: int) -> Any:
    if depth > 16:
        raise ValueError("arguments nested deeper than 16")
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, list):
        return tuple(_decode_arg(x, env, depth + 1) for x in a)
    if not isinstance(a, dict) or len(a) != 1:
        raise ValueError(f"an argument is {str(a)[:60]}")
    (kind, body), = a.items()
    if kind == "node":
        if body not in env:
            raise ValueError(f"an argument refers to node {str(body)[:40]!r} before it exists")
        return env[body]
    if kind == "list" and isinstance(body, list):
        return [_decode_arg(x, env, depth + 1) for x in body]
    if kind == "dict" and isinstance(body, dict):
        return {str(k): _decode_arg(v, env, depth + 1) for k, v in body.items()}
    if kind == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if kind == "dtype":
        return dtype_named(body)
    if kind == "device":
        return device_named(body)
    if kind == "layout" and body in _LAYOUTS:
        return _LAYOUTS[body]
    if kind == "memory_format" and body in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[body]
    raise ValueError(f"an argument of kind {str(kind)[:40]!r}")
