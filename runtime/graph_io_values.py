"""meta["val"] of a saved graph node: fake tensors with symbolic sizes, as JSON and back.

Saving writes each value's dtype, sizes, strides and device, with symbolic sizes as expression
trees (`["Mul", 64, "s1"]`: an int, a symbol name, or [function, *args]; symbols are named s0,
s1, … in order of first appearance, so saving a graph, loading it and saving it again writes the
same file). Loading rebuilds them in one new ShapeEnv and FakeTensorMode, with no parsing of
expression text: each function name is looked up in a fixed table of sympy / torch size
functions and called on the rebuilt args.
Tensors of the same layout share one meta tensor, so rebuilding thousands costs milliseconds.
"""
from __future__ import annotations

import math
from typing import Any

import sympy
import torch

from .artifact_errors import PROGRAM, RESAVE, ArtifactError

__all__ = ["encode_val", "ValueDecoder", "SymbolNames", "NOT_STORED"]

NOT_STORED = object()  # a value encode_val cannot write: the node is saved without meta["val"]


def _size_functions() -> dict[str, type]:
    from torch.utils._sympy import functions as F

    table = {c.__name__: c for c in (sympy.Add, sympy.Mul, sympy.Pow, sympy.Abs,
                                     sympy.floor, sympy.ceiling, sympy.Rational)}
    for name in ("FloorDiv", "CeilDiv", "ModularIndexing", "CleanDiv", "PythonMod", "Mod",
                 "CeilToInt", "FloorToInt", "PowByNatural", "IntTrueDiv", "TruncToInt",
                 "RoundToInt", "Identity", "Max", "Min", "Where", "LShift", "RShift"):
        if getattr(F, name, None) is not None:
            table[name] = getattr(F, name)
    table.setdefault("Max", sympy.Max)
    table.setdefault("Min", sympy.Min)
    return table


_FUNCTIONS = _size_functions()
_RAISING = ("Pow", "PowByNatural", "LShift")  # grow with their second argument's value
_LARGEST = 2**63 - 1
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values()
           if isinstance(d, torch.dtype)}


def dtype_named(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise ArtifactError(f"{PROGRAM} names an unknown dtype {str(name)[:40]!r}; {RESAVE}")
    return _DTYPES[name]


def device_named(name: Any) -> torch.device:
    if not isinstance(name, str) or len(name) > 40:
        raise ArtifactError(f"{PROGRAM} names a device {str(name)[:40]!r}; {RESAVE}")
    try:
        device = torch.device(name)  # parsed by torch's C++ device parser: no eval
    except RuntimeError as e:
        raise ArtifactError(f"{PROGRAM} names an unknown device {name!r}; {RESAVE}") from e
    if not device_available(device):  # it loaded, and every call failed in the generated code
        raise ArtifactError(f"{PROGRAM} was compiled for {device}, which this machine does not have (its graph "
                            f"makes and checks tensors there): load it on a machine with {device.type}, or compile "
                            "the original model with its policy again here (the policy is in meta.json)")
    return device


def device_available(device: torch.device) -> bool:
    """Whether this process can put tensors on `device` (cuda:1 on a one-GPU machine cannot)."""
    if device.type in ("cpu", "meta"):
        return True
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, torch.mps
    available, count = getattr(backend, "is_available", None), getattr(backend, "device_count", None)
    if not callable(available) or not available():
        return False
    return device.index is None or not callable(count) or device.index < count()


# ---- save -----------------------------------------------------------------------------------


def _expr(e: sympy.Basic) -> Any:
    if isinstance(e, sympy.Integer):
        return int(e)
    if isinstance(e, sympy.Symbol):
        return e.name
    if isinstance(e, sympy.Rational):
        return ["Rational", int(e.p), int(e.q)]
    name = type(e).__name__
    if _FUNCTIONS.get(name) is not type(e):
        raise ValueError(f"size expression {e} uses {name}, which artifacts cannot store")
    return [name, *(_expr(a) for a in e.args)]


def _size(s: Any, names: SymbolNames) -> Any:
    if isinstance(s, torch.SymInt):
        return _expr(names.expr(s.node.expr))
    return int(s)


def encode_val(val: Any, names: SymbolNames) -> Any:
    """JSON for a node's meta["val"], or NOT_STORED for a kind of value artifacts do not keep.
    Its size symbols are written under `names`."""
    if val is None or isinstance(val, bool):
        return val
    if isinstance(val, torch.Tensor):
        if val.layout != torch.strided or val.is_quantized:
            return NOT_STORED
        try:
            sizes = [_size(s, names) for s in val.shape]
            strides = [_size(s, names) for s in val.stride()]
        except ValueError:
            return NOT_STORED
        return {"tensor": [str(val.dtype).removeprefix("torch."), sizes, strides,
                           str(val.device), bool(val.requires_grad)]}
    if isinstance(val, torch.SymInt):
        try:
            return {"symint": _expr(names.expr(val.node.expr))}
        except ValueError:
            return NOT_STORED
    if isinstance(val, int):
        return {"int": val}
    if isinstance(val, float) and math.isfinite(val):
        return {"float": val}
    if isinstance(val, (list, tuple)):
        items = [encode_val(v, names) for v in val]
        if any(i is NOT_STORED for i in items):
            return NOT_STORED
        return {"list" if isinstance(val, list) else "tuple": items}
    return NOT_STORED


class SymbolNames:
    """Every size symbol of a graph's values, renamed s0, s1, … (u0, u1, … unbacked) in order of
    first appearance, with its hint (None when unbacked): `.table` is program.json's symbol table.
    Export and the ShapeEnv a load builds number symbols by their own counters (s72 and s53 in one
    save, s45 and s70 in the next), so a model saved, loaded and saved again wrote other files."""

    def __init__(self, vals: list[Any]):
        self.table: dict[str, int | None] = {}
        self._to: dict[sympy.Symbol, sympy.Symbol] = {}
        for v in vals:
            self._visit(v)

    def expr(self, e: sympy.Basic) -> sympy.Basic:
        """`e` over the new names (sympy orders the arguments by them, so the written tree is
        the same whatever the symbols were called before, as long as the names are)."""
        return e.xreplace(self._to) if self._to else e

    def _visit(self, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            for s in (*v.shape, *v.stride()):
                self._visit(s)
        elif isinstance(v, torch.SymInt):
            env = v.node.shape_env
            known = getattr(env, "backed_var_to_val", None) or env.var_to_val
            # several new symbols in one expression (rare: a size is first seen alone) go by hint,
            # then by name, which a load renames: only symbols of equal hints may swap there
            new = [s for s in v.node.expr.free_symbols if s not in self._to]
            for sym in sorted(new, key=lambda s: (known.get(s) is None, int(known.get(s) or 0), str(s))):
                hint = known.get(sym)
                prefix = "u" if hint is None else "s"
                name = f"{prefix}{sum(1 for n in self.table if n[0] == prefix)}"
                self._to[sym] = sympy.Symbol(name, **sym.assumptions0)
                self.table[name] = None if hint is None else int(hint)
        elif isinstance(v, (list, tuple)):
            for x in v:
                self._visit(x)


# ---- load -----------------------------------------------------------------------------------


class ValueDecoder:
    """Rebuilds saved values in one ShapeEnv / FakeTensorMode, symbols first."""

    def __init__(self, symbols: Any):
        from torch._dynamo.source import ConstantSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

        if not isinstance(symbols, dict):
            raise ArtifactError(f"{PROGRAM} has no symbol table; {RESAVE}")
        self.env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.env, allow_non_fake_inputs=True)
        self.symbols: dict[str, sympy.Expr] = {}
        self.hints: dict[sympy.Expr, int] = {}
        for name, hint in symbols.items():
            if not (isinstance(name, str) and name.isidentifier()):
                raise ArtifactError(f"{PROGRAM} has a size symbol {str(name)[:40]!r} that is "
                                    f"not a plain name; {RESAVE}")
            if hint is None:
                sym = self.env.create_unbacked_symint().node.expr
            elif isinstance(hint, int) and not isinstance(hint, bool) and 0 <= hint <= _LARGEST:
                sym = self.env.create_symbol(hint, ConstantSource(f"slimfx_{name}"),
                                             dynamic_dim=DimDynamic.DYNAMIC)
                self.hints[sym] = hint
            else:
                raise ArtifactError(f"{PROGRAM}: size symbol {name} has hint {hint!r}, not a "
                                    f"size; {RESAVE}")
            self.symbols[name] = sym
        self._symints: dict[str, Any] = {}
        self._metas: dict[tuple, torch.Tensor] = {}

    def decode(self, doc: Any) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor

        if doc is None or isinstance(doc, bool):
            return doc
        if not isinstance(doc, dict) or len(doc) != 1:
            raise ValueError(f"a value is {str(doc)[:60]}")
        (kind, body), = doc.items()
        if kind == "tensor":
            dtype, sizes, strides, device, grad = body
            key = (dtype, repr(sizes), repr(strides), bool(grad))
            meta = self._metas.get(key)
            if meta is None:
                meta = torch.empty_strided([self.size(s) for s in sizes],
                                           [self.size(s) for s in strides],
                                           dtype=dtype_named(dtype), device="meta")
                if grad:
                    meta.requires_grad_(True)
                self._metas[key] = meta
            return FakeTensor(self.mode, meta, device_named(device))
        if kind == "symint":
            return self.size(body)
        if kind == "int" and type(body) is int:
            return body
        if kind == "float" and isinstance(body, (int, float)):
            return float(body)
        if kind in ("list", "tuple") and isinstance(body, list):
            items = [self.decode(v) for v in body]
            return items if kind == "list" else tuple(items)
        raise ValueError(f"a value of kind {kind!r}")

    def size(self, doc: Any) -> Any:
        """An int, or a SymInt over this decoder's symbols."""
        if type(doc) is int:
            return doc
        key = repr(doc)
        if key not in self._symints:
            expr = self._expr(doc, 0)
            if isinstance(expr, sympy.Integer):
                self._symints[key] = int(expr)
            else:
                if self._bound(doc) > _LARGEST:  # xreplace would work 2**(64**6) out exactly
                    raise ValueError(f"a size expression {str(doc)[:40]} is beyond int64 at its hints")
                hint = expr.xreplace(self.hints)
                hint = int(hint) if isinstance(hint, sympy.Integer) else None
                self._symints[key] = self.env.create_symintnode(expr, hint=hint)
        return self._symints[key]

    def _bound(self, doc: Any) -> float:
        """An upper bound of |value| at the symbols' hints, in floats (inf past their range):
        sums and products as such, powers and shifts by their exponent, anything else (division,
        modulo, min/max, rounding) by its largest argument plus one. `doc` has passed _expr."""
        if type(doc) is int:
            return float(abs(doc))
        if isinstance(doc, str):
            hint = self.hints.get(self.symbols[doc])
            return float(_LARGEST if hint is None else hint)
        name, args = doc[0], [self._bound(a) for a in doc[1:]]
        try:
            if name == "Add":
                return float(sum(args))
            if name == "Mul":
                return math.prod(args)
            if name in ("Pow", "PowByNatural"):
                return max(1.0, args[0]) ** args[1]  # |b**e| <= max(1, |b|)**|e|
            if name == "LShift":
                return args[0] * 2.0 ** args[1]
        except OverflowError:
            return math.inf
        return max(args, default=0.0) + 1.0

    def _expr(self, doc: Any, depth: int) -> sympy.Expr:
        if depth > 32:
            raise ValueError("a size expression nested deeper than 32")
        if type(doc) is int:
            if abs(doc) > _LARGEST:
                raise ValueError(f"a size literal {str(doc)[:40]} is beyond int64")
            return sympy.Integer(doc)
        if isinstance(doc, str):
            if doc not in self.symbols:
                raise ValueError(f"size symbol {doc[:40]!r} is not in the symbol table")
            return self.symbols[doc]
        if isinstance(doc, list) and doc and isinstance(doc[0], str):
            fn = _FUNCTIONS.get(doc[0])
            if fn is None:
                raise ArtifactError(f"{PROGRAM} uses size function {doc[0][:40]!r}, which is "
                                    f"not one slimfx rebuilds; {RESAVE}")
            if fn is sympy.Rational:
                p, q = doc[1:]
                if type(p) is not int or type(q) is not int or q == 0:
                    raise ValueError("a Rational of non-integers")
                return sympy.Rational(p, q)
            args = [self._expr(a, depth + 1) for a in doc[1:]]
            if doc[0] in _RAISING and not (len(args) == 2 and isinstance(args[1], sympy.Integer)
                                           and abs(int(args[1])) <= 64):
                # sympy works out 10**(10**12) exactly: a crafted file would hang load()
                raise ValueError(f"a size {doc[0]} by {str(args[1:])[:40]}, not a literal "
                                 "of at most 64")
            out = fn(*args)
            if isinstance(out, sympy.Integer) and abs(int(out)) > _LARGEST:
                raise ValueError(f"a size expression {str(doc)[:40]} is beyond int64")
            return out
        raise ValueError(f"a size expression is {str(doc)[:60]}")
