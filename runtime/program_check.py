"""What a saved graph may name: the allow-lists that program.json is checked against.

load() builds the fx graph itself (runtime/graph_io.py) from names alone, so this is the whole
attack surface: every call target is an operator registered in this process under the aten,
prims or slimfx namespace, or one of a fixed set of Python functions on sizes (getitem, sym_max,
…); no operator that reaches outside the process's tensors (a file name, a storage, free text:
`aten.from_file(shared=True)` then `fill_` would write any file the user can); every node name a Python identifier (fx pastes names into forward()'s source); every
attribute path dotted identifiers. Nothing is imported, evaluated or unpickled.
"""
from __future__ import annotations

import keyword
import math
import operator
import re
from typing import Any, Callable

import torch

from .artifact_errors import PROGRAM, RESAVE, ArtifactError

__all__ = ["op_name", "resolve_target", "check_name", "check_path", "refused", "load_refuses"]

OP_NAMESPACES = ("aten", "prims", "slimfx")
REFUSED = "slimfx never runs code from an artifact"
_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH_PART = re.compile(r"[A-Za-z0-9_]+")  # ModuleList children are digits
# The string arguments a model's graph passes: fixed option words (gelu's approximate="tanh",
# div's rounding_mode, a conv's padding="same", an assert's message). Any other string argument
# (from_file's filename, save's, _print's text) or a Storage marks an operator load() refuses.
_OPTION_WORDS = frozenset({
    "approximate", "rounding_mode", "side", "reduce", "reduction", "padding_mode", "mode",
    "pad_mode", "padding", "padding_side", "equation", "interpolation", "indexing", "UPLO",
    "driver", "ord", "norm", "compute_mode", "activation", "msg", "assert_msg", "api_name"})


def _functions() -> dict[str, Callable]:
    """Plain Python callables an exported graph applies to sizes and tuples."""
    table = {f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "abs")}
    table.update({f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")})
    for n in ("sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite", "sym_sqrt",
              "sym_sum"):
        if callable(getattr(torch, n, None)):
            table[f"torch.{n}"] = getattr(torch, n)
    return table


_FUNCTIONS = _functions()
_FUNCTION_NAMES = {id(f): n for n, f in _FUNCTIONS.items()}


def op_name(target: Any) -> str | None:
    """The name a call target is saved under, or None if artifacts cannot store it."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace not in OP_NAMESPACES:
            return None
        name = target._schema.name.split("::", 1)[1]
        return f"{target.namespace}.{name}.{target._overloadname}"
    return _FUNCTION_NAMES.get(id(target))


def resolve_target(name: Any) -> Callable:
    """The operator or function `name` stands for; ArtifactError if it is not allowed."""
    if isinstance(name, str) and name in _FUNCTIONS:
        return _FUNCTIONS[name]
    if not isinstance(name, str):
        raise refused(f"a node target is {type(name).__name__}, not an operator name")
    parts = name.split(".")
    if (len(parts) != 3 or parts[0] not in OP_NAMESPACES
            or not all(_PART.fullmatch(p) for p in parts[1:]) or parts[2].startswith("_")):
        raise refused(f"node target {name[:80]!r} is not an allowed operator (only "
                       f"{', '.join(OP_NAMESPACES)} operators and size arithmetic are)")
    ns, op, overload = parts
    try:  # the dispatcher's op lookup (`__and__` is an aten op); nothing is imported or run
        packet = getattr(getattr(torch.ops, ns), op)
        target = getattr(packet, overload)
    except (AttributeError, RuntimeError):
        target = None
    if not (isinstance(target, torch._ops.OpOverload)  # not some Python attribute of the packet
            and target._schema.name == f"{ns}::{op}" and target._overloadname == overload):
        if ns == "slimfx":
            raise ArtifactError(f"{PROGRAM} uses operator {name!r}, which this slimfx does not "
                                "register: the artifact needs a newer slimfx (upgrade it)")
        raise ArtifactError(f"{PROGRAM} uses operator {name!r}, which this torch "
                            f"{torch.__version__} does not have: load it with the torch that "
                            f"saved it or {RESAVE} under this one")
    outside = _reaches_outside(target._schema)
    if outside:
        raise refused(f"operator {name!r} {outside}; a model's graph never does")
    return target


def load_refuses(target: Any) -> str | None:
    """Why load() would refuse the operator `target` although its namespace is allowed, or None:
    save() asks first, so that a model is not saved as an artifact nobody can load."""
    return _reaches_outside(target._schema) if isinstance(target, torch._ops.OpOverload) else None


def _reaches_outside(schema) -> str | None:
    """Why an operator can touch something beyond tensors (a file, a storage), or None."""
    for arg in schema.arguments:
        kind = str(arg.type)
        if "Storage" in kind:
            return f"takes a storage ({arg.name})"
        if "str" in kind and arg.name not in _OPTION_WORDS:
            return f"takes a free string ({arg.name}: {kind})"
    return None


def check_name(name: Any, what: str = "node name") -> str:
    if not (isinstance(name, str) and _PART.fullmatch(name) and not keyword.iskeyword(name)
            and not name.startswith("__")):
        raise refused(f"{what} {str(name)[:80]!r} is not a plain name")
    return name


def check_path(path: Any, what: str = "attribute path") -> str:
    if not (isinstance(path, str) and len(path) < 1000
            and all(_PATH_PART.fullmatch(p) and not p.startswith("__")
                    for p in path.split("."))):
        raise refused(f"{what} {str(path)[:80]!r} is not a dotted name")
    return path


def refused(problem: str) -> ArtifactError:
    """The error for a program.json that asks for something load() never does."""
    return ArtifactError(f"{PROGRAM} is refused: {problem}. {REFUSED}; {RESAVE} from a "
                         "trusted model")
