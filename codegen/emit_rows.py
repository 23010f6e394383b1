"""The row template: Triton source for a pointwise or row group of partition.py (float32).

One program per row of the group's full shape [R, D] (leading dims flattened). Each value the
group reads or writes has a role by its symbolic shape against the full one: "full" ([…, D]),
"row" ([…, 1] or […], one value per row), "col" ([D], the same for every row, e.g. a norm
weight) or "scalar". Ops become `tl` expressions (codegen/expr.py); the one row reduction becomes a
`tl.sum`/`tl.max` over the masked row. A group this template cannot express (a transposing view,
another dtype, an op missing from the table) raises Unsupported naming the node — never a wrong
kernel.

The source is text; `RowKernel.compile()` writes it to a cache file named by its hash and imports
that (the same group never generates twice). Without a GPU, run with TRITON_INTERPRET=1 set
before triton is imported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import fx

from .expr import Unsupported, expression, reduction_lines
from .ops import kind_of
from .partition import Group

__all__ = ["RowKernel", "emit_rows", "Unsupported"]


@dataclass
class RowKernel:
    source: str
    name: str
    inputs: list[tuple[fx.Node, str]]  # (value, role) in kernel-argument order
    outputs: list[tuple[fx.Node, str]]
    _fn: Optional[object] = field(default=None, repr=False)

    def compile(self, cache: Optional[Path] = None):
        """Import the kernel from its source (cached by hash)."""
        if self._fn is None:
            folder = Path(cache or os.environ.get("SLIMFX_KERNEL_CACHE") or Path(tempfile.gettempdir()) / "slimfx-kernels")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{self.name}.py"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_text(self.source)
                tmp.replace(path)
            spec = importlib.util.spec_from_file_location(f"slimfx_kernels.{self.name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._fn = module.kernel
        return self._fn

    def run(self, values: list[torch.Tensor], full_shape: torch.Size) -> list[torch.Tensor]:
        """Launch on `values` (the inputs, in order) for a group whose full shape is `full_shape`."""
        import triton  # here, not at module level: TRITON_INTERPRET must be set before the first import

        fn = self.compile()
        d = int(full_shape[-1]) if len(full_shape) else 1
        rows = math.prod(int(s) for s in full_shape[:-1]) if len(full_shape) else 1
        args = [_argument(v, role, rows, d) for v, (_, role) in zip(values, self.inputs)]
        outs = [torch.empty(rows * d if role == "full" else rows, dtype=torch.float32, device=values[0].device
                            if values else "cpu") for _, role in self.outputs]
        fn[(rows,)](*args, *outs, d, BLOCK=triton.next_power_of_2(d))
        shaped = []
        for out, (node, role) in zip(outs, self.outputs):
            want = node.meta["tensor_meta"].shape if "tensor_meta" in node.meta else None
            shaped.append(out.view(want) if want is not None else out)
        return shaped


def _argument(value: torch.Tensor, role: str, rows: int, d: int) -> torch.Tensor:
    if value.dtype != torch.float32:
        raise Unsupported(f"an input of dtype {value.dtype}: the row template is float32")
    flat = value.contiguous().reshape(-1)
    want = {"full": rows * d, "row": rows, "col": d, "scalar": 1}[role]
    if flat.numel() != want:
        raise ValueError(f"a {role} input holds {flat.numel()} values, expected {want}")
    return flat


def emit_rows(group: Group) -> RowKernel:
    """Triton source for a "pointwise" or "rows" group (module doc)."""
    if group.kind not in ("pointwise", "rows"):
        raise Unsupported(f"a {group.kind} group: the row template takes pointwise and row groups")
    full = _full_shape(group)
    names: dict[fx.Node, str] = {}
    roles: dict[fx.Node, str] = {}
    inputs = [(n, _role(n, full)) for n in group.inputs if _is_tensor(n)]
    lines = []
    for i, (node, role) in enumerate(inputs):
        names[node], roles[node] = f"in{i}", role
        lines.append(_load(f"in{i}", role))
    for node in group.nodes:
        var = f"v_{node.name}"
        if kind_of(node) == "free":
            src = node.all_input_nodes[0]
            role = _role(node, full)
            if role != roles[src] and not (roles[src] in ("row", "scalar", "col") and role == "full"):
                raise Unsupported(f"{node.name} ({node.target}) changes the layout inside the group")
            names[node], roles[node] = names[src], role
            continue
        operand = lambda a: names[a] if isinstance(a, fx.Node) else a  # noqa: E731
        if kind_of(node) == "reduction":
            lines += reduction_lines(node, var, operand)
        else:
            lines.append(f"    {var} = {expression(node, operand)}")
        names[node], roles[node] = var, _role(node, full)
    outputs = [(n, roles[n]) for n in group.outputs]
    for i, (node, role) in enumerate(outputs):
        if role not in ("full", "row"):
            raise Unsupported(f"{node.name}: an output of role {role}")
        lines.append(_store(f"out{i}", names[node], role))
    params = ", ".join([f"in{i}_ptr" for i in range(len(inputs))] + [f"out{i}_ptr" for i in range(len(outputs))])
    body = "\n".join(lines)
    header = "\n".join(f"# {n.name}: {n.target}" for n in group.nodes if kind_of(n) != "free")
    source = (f"# generated by slimfx codegen/emit_rows.py for the group:\n{header}\n"
              "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
              f"def kernel({params}, D, BLOCK: tl.constexpr):\n"
              "    row = tl.program_id(0)\n    cols = tl.arange(0, BLOCK)\n    m = cols < D\n"
              f"{body}\n")
    name = "rows_" + hashlib.sha256(source.encode()).hexdigest()[:16]
    return RowKernel(source, name, inputs, outputs)


def _load(var: str, role: str) -> str:
    return {
        "full": f"    {var} = tl.load({var}_ptr + row * D + cols, mask=m, other=0.0)",
        "row": f"    {var} = tl.load({var}_ptr + row)",
        "col": f"    {var} = tl.load({var}_ptr + cols, mask=m, other=0.0)",
        "scalar": f"    {var} = tl.load({var}_ptr)",
    }[role]


def _store(var: str, value: str, role: str) -> str:
    if role == "full":
        # A row value stored at full shape is broadcast first (0 * cols keeps the block shape).
        return f"    tl.store({var}_ptr + row * D + cols, {value} + tl.zeros([BLOCK], tl.float32), mask=m)"
    return f"    tl.store({var}_ptr + row, {value})"


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _shape(node: fx.Node) -> tuple[str, ...]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise Unsupported(f"{node.name} has no tensor value")
    if val.dtype != torch.float32:
        raise Unsupported(f"{node.name} is {val.dtype}: the row template is float32")
    return tuple(str(s) for s in val.shape)


def _full_shape(group: Group) -> tuple[str, ...]:
    ref = group.reduction.args[0] if group.reduction is not None else next(
        n for n in group.nodes if kind_of(n) != "free")
    return _shape(ref)


def _role(node: fx.Node, full: tuple[str, ...]) -> str:
    shape = _shape(node)
    if shape == full:
        return "full"
    if full and (shape == full[:-1] + ("1",) or shape == full[:-1]):
        return "row"
    if all(s == "1" for s in shape):
        return "scalar"
    if full and shape and shape[-1] == full[-1] and all(s == "1" for s in shape[:-1]):
        return "col"
    raise Unsupported(f"{node.name} {shape} against the group's rows {full}")
