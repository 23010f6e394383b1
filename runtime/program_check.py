"""What load() lets torch deserialize: a program.json that cannot make torch run code.

torch's deserializer trusts its input, so runtime/artifact.py passes every program through
check_program() first. Also: metadata trimming on save, and the tensors a program expects.
"""
from __future__ import annotations

import ast
import keyword
import math
import operator
import re
from typing import Any

import torch

from .artifact_errors import PROGRAM, RESAVE, ArtifactError

__all__ = ["check_program", "keep_metadata", "expected_tensors"]

# ---- program.json: what torch may deserialize ---------------------------------------------------
# torch's deserializer trusts its input: it resolves call targets by getattr on `torch`, parses
# symbolic sizes with sympy.sympify (an eval), exec()s `guards_code`, and fx pastes node and
# parameter names into the Python source of forward(). So before it runs, every target must be
# an operator, every expression plain arithmetic on size symbols, every name an identifier.

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")  # s0, u3, zuf0: shape-env symbols
# Sizes are sympy srepr text: `Mul(Integer(64), Symbol('s53', positive=True, integer=True))`.
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan",
    "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not", "floor", "ceiling",
    "oo", "zoo", "true", "false", "True", "False",
    # the functions torch's deserializer puts in sympify's namespace
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
})
_SYMBOL_FLAGS = frozenset({"positive", "negative", "nonnegative", "integer", "real", "finite"})
_EXPR_NODES = (ast.Expression, ast.expr_context, ast.BinOp, ast.UnaryOp, ast.Compare,
               ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
_OP_NAMESPACES = frozenset({"aten", "prims", "slimfx"})
_KEPT_METADATA = ("nn_module_stack", "source_fn_stack", "torch_fn", "custom")
_NAME_KEYS = ("name", "as_name")
_PATH_KEYS = ("parameter_name", "buffer_name", "tensor_constant_name")


def check_program(doc: Any, input_names: list[str]) -> None:
    """Refuse a program.json torch could be made to run code from (see the banner above)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise ArtifactError(f"{PROGRAM} is not a torch.export program; {RESAVE}")
    _check_schema(doc)
    problems: list[str] = []
    if doc.get("guards_code"):
        problems.append("it carries guard code (Python source)")
    keep_metadata(doc)
    _walk(doc, None, problems)
    root = (doc["graph_module"].get("module_call_graph") or [{}])[0].get("signature") or {}
    if root.get("forward_arg_names") != input_names:
        problems.append(f"its inputs {root.get('forward_arg_names')} are not meta.json's "
                        f"{input_names}")
    if problems:
        raise ArtifactError(f"{PROGRAM} is refused: {'; '.join(problems[:5])}. slimfx never "
                            f"runs code from an artifact; {RESAVE} from a trusted model")


def _check_schema(doc: dict) -> None:
    from torch._export.serde.serialize import SCHEMA_VERSION

    major = (doc.get("schema_version") or {}).get("major")
    if major != SCHEMA_VERSION[0]:
        raise ArtifactError(
            f"{PROGRAM} uses torch.export schema {major} (torch {doc.get('torch_version', '?')});"
            f" torch {torch.__version__} reads schema {SCHEMA_VERSION[0]}: load it with the "
            f"torch that saved it or {RESAVE} under this one")


def keep_metadata(doc: Any) -> None:
    """Node metadata minus stack traces (local paths, and code comments in fx's source) and
    provenance: only what the ModelGraph index and passes read."""
    for node in _nodes(doc):
        meta = node.get("metadata") or {}
        node["metadata"] = {k: meta[k] for k in _KEPT_METADATA if isinstance(meta.get(k), str)}


def _nodes(doc: Any):
    """Every serialized fx node, nested subgraphs (higher-order ops) included."""
    if isinstance(doc, dict):
        if {"target", "inputs", "outputs"} <= doc.keys():
            yield doc
        for v in doc.values():
            yield from _nodes(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _nodes(v)


def _walk(doc: Any, key: str | None, problems: list[str]) -> None:
    if isinstance(doc, dict):
        if {"target", "inputs", "outputs"} <= doc.keys() and not _allowed_target(doc["target"]):
            problems.append(_target_problem(str(doc["target"])[:80]))
        if "custom_obj" in doc:
            problems.append("it holds a script object, which only pickle could restore")
        for k, v in doc.items():
            _walk(v, k, problems)
    elif isinstance(doc, list):
        for v in doc:
            _walk(v, "forward_arg_names" if key == "forward_arg_names" else None, problems)
    elif isinstance(doc, str):
        bad = ((key == "expr_str" and not _safe_expr(doc))
               or (key in _NAME_KEYS + ("forward_arg_names",) and not _identifier(doc))
               or (key in _PATH_KEYS and not _PATH.fullmatch(doc)))
        if bad:
            problems.append(f"{key} {doc[:80]!r} is not a plain name or size expression")


def _identifier(s: str) -> bool:
    return bool(_NAME.fullmatch(s)) and not keyword.iskeyword(s)


def _safe_expr(expr: str) -> bool:
    """Calls of sympy constructors and the functions above on literals, and arithmetic:
    nothing sympify's eval could turn into an attribute access or an import."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return False
    return all(_safe_expr_node(n) for n in ast.walk(tree))


def _safe_expr_node(n: ast.AST) -> bool:
    if isinstance(n, ast.Call):
        return isinstance(n.func, ast.Name) and n.func.id in _SYMPY_NAMES
    if isinstance(n, ast.Name):
        return n.id in _SYMPY_NAMES or bool(_SYMBOL.fullmatch(n.id))
    if isinstance(n, ast.keyword):
        return n.arg in _SYMBOL_FLAGS and isinstance(n.value, ast.Constant)
    if isinstance(n, ast.Constant):  # a symbol's name, or a number
        if isinstance(n.value, str):
            return bool(_SYMBOL.fullmatch(n.value))
        return isinstance(n.value, (bool, int, float))
    return isinstance(n, _EXPR_NODES)


def _allowed_target(target: Any) -> bool:
    """An operator registered in this process (aten, prims, slimfx, higher-order) or one of
    the symbolic-int ops; resolved as torch's deserializer would, never called."""
    from torch._export.serde.serialize import _SYM_OPS  # private, but there since torch 2.1

    if not isinstance(target, str):
        return False
    head, *rest = target.split(".")
    if not rest or not all(_NAME.fullmatch(p) for p in rest):
        return False
    if head == "torch" and rest[0] != "ops" and not rest[0].lstrip("_").startswith("sym"):
        return False  # e.g. torch.load: no attribute of torch but its ops and sym functions
    obj = {"torch": torch, "_operator": operator, "math": math}.get(head)
    for part in rest:
        obj = getattr(obj, part, None)
    if isinstance(obj, torch._ops.OpOverload):
        return obj.namespace in _OP_NAMESPACES
    return isinstance(obj, torch._ops.HigherOrderOperator) or any(obj is op for op in _SYM_OPS)


def _target_problem(target: str) -> str:
    if target.startswith("torch.ops.slimfx."):
        return (f"operator {target!r} is not registered: the artifact needs a newer slimfx "
                "(upgrade it)")
    return f"node target {target!r} is not an allowed operator"


def expected_tensors(doc: dict) -> dict[str, tuple]:
    """name -> (kind, shape, dtype or None, requires_grad) for every lifted tensor the program
    reads; kind "parameter", "buffer" (persistent, in the state dict) or "constant"."""
    from torch._export.serde import serialize as serde

    dtypes = getattr(serde, "_SERIALIZE_TO_TORCH_DTYPE", {})  # private: skip the check without
    values = doc["graph_module"]["graph"].get("tensor_values", {})
    expected = {}
    for spec in doc["graph_module"]["signature"]["input_specs"]:
        (kind, body), = spec.items()
        if kind == "buffer":
            name, kind = body["buffer_name"], "buffer" if body.get("persistent") else "constant"
        elif kind in ("parameter", "tensor_constant"):
            name = body[f"{kind}_name"]
            kind = "parameter" if kind == "parameter" else "constant"
        else:
            continue  # user inputs and effect tokens are not stored
        meta = values.get(body["arg"]["name"], {})
        shape = tuple(s.get("as_int") for s in meta.get("sizes", ()))
        dtype, grad = dtypes.get(meta.get("dtype")), bool(meta.get("requires_grad"))
        expected[name] = (kind, shape, dtype, grad)
    return expected
