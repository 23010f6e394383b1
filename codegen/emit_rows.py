"""The row template: Triton source for a pointwise or row group of partition.py (float32, float16
and bfloat16 values, computed in float32 with each half-precision op's result rounded as eager
rounds it: codegen/dtypes.py).

One program per row of the group's full shape [R, D] (leading dims flattened). Each value the
group reads or writes has a role by its symbolic shape against the full one: "full" ([…, D]),
"row" ([…, 1] or […], one value per row), "col" ([D], the same for every row, e.g. a norm
weight), "scalar", or "bcast": any other shape that broadcasts to the full one (rotary's cos/sin
[1, 1, T, D] against [B, H, T, D]), read through its broadcast strides from the row's
coordinates. Ops become `tl` expressions (codegen/expr.py); the one row reduction becomes a
`tl.sum`/`tl.max` over the masked row. A group this template cannot express (a transposing view,
an integer or bool value, an op missing from the table) raises Unsupported naming the node —
never a wrong kernel. Variables are numbered, not named after nodes, so equal groups share one
source (codegen/kernel.py caches and imports it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch
from torch import fx

from .dtypes import float_value, narrowed, widened
from .expr import Unsupported, node_value, reduction_lines
from .kernel import Kernel, interpreted, rows_of
from .ops import keeps_order, kind_of
from .partition import Group
from .tuning import autotuned, row_configs, tuning_enabled

__all__ = ["RowKernel", "emit_rows", "Unsupported"]


@dataclass
class RowKernel(Kernel):
    full: Optional[fx.Node] = None  # a value of the group's full shape (the rows)

    def shape_nodes(self) -> list[fx.Node]:
        return super().shape_nodes() + [self.full]

    @cached_property
    def reads_bcast(self) -> bool:  # asked at every launch
        return any(role == "bcast" for _, role in self.inputs)

    def launch(self, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on `values` (the inputs, in order); the outputs, shaped as the graph's."""
        self.check_dtypes(values)
        *shapes, full = self.output_shapes(values)
        d = int(full[-1]) if len(full) else 1
        rows = rows_of(full)
        device = values[0].device if values else torch.device("cpu")
        args = [_argument(v, role, rows, d) for v, (_, role) in zip(values, self.inputs)]
        outs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in zip(shapes, self.output_dtypes())]
        extra = []  # the bcast inputs' coordinates: the full shape's leading sizes, their strides
        if self.reads_bcast:
            extra += list(full[:-1])
            for v, (_, role) in zip(values, self.inputs):
                if role == "bcast":
                    extra += list(torch.broadcast_to(v, full).stride())
        if rows and d:
            block = 1 << (d - 1).bit_length()  # triton.next_power_of_2(d), without its constexpr wrapper's cost
            interpreting = interpreted()
            if tuning_enabled(interpreting):  # one launcher per row width: its own timings
                self.launch_tuned(("rows", block), lambda: autotuned(self.compile(), row_configs(), ["D"], interpreting),
                                  (rows,), (*args, *outs, d, *extra), {"BLOCK": block}, sizes=(d,))
            else:
                self.compile()[(rows,)](*args, *outs, d, *extra, BLOCK=block)
        return outs


def _argument(value: torch.Tensor, role: str, rows: int, d: int) -> torch.Tensor:
    if role == "bcast":
        return value  # read in place through its broadcast strides
    flat = value.contiguous().reshape(-1)
    want = rows * d if role == "full" else rows if role == "row" else d if role == "col" else 1  # or "scalar"
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
    if not inputs:
        raise Unsupported(f"{group.nodes[0].name}: a group that reads no tensor")
    lines, extra = [], []
    bcast = [i for i, (_, role) in enumerate(inputs) if role == "bcast"]
    if bcast:
        lead = len(full) - 1
        extra = [f"F{j}" for j in range(lead)] + [f"in{i}_s{j}" for i in bcast for j in range(lead + 1)]
        lines.append("    r = row")
        for j in reversed(range(lead)):
            lines.append(f"    c{j} = r % F{j}\n    r = r // F{j}")
    for i, (node, role) in enumerate(inputs):
        names[node], roles[node] = f"in{i}", role
        # a bcast input of last size 1 ([B, 1, 1] against [B, S, D]) holds one value per row: loaded
        # as a [BLOCK] vector, a row value computed from it was stored to one address (an error)
        per_row = role == "bcast" and _shape(node)[-1:] == ("1",) and full[-1:] != ("1",)
        lines.append(_load(f"in{i}", role, len(full) - 1, float_value(node, "row").dtype, per_row))
    for i, node in enumerate(group.nodes):
        var = f"v{i}"
        if kind_of(node) == "free":
            if not keeps_order(node):
                raise Unsupported(f"{node.name} ({node.target}) reorders elements inside the group")
            src = node.all_input_nodes[0]
            role = _role(node, full)
            widened = role == "full" and (roles[src] in ("row", "scalar", "col") or (
                roles[src] == "bcast" and node.target is torch.ops.aten.expand.default))
            if role != roles[src] and not widened:
                raise Unsupported(f"{node.name} ({node.target}) changes the layout inside the group")
            names[node], roles[node] = names[src], role
            continue
        operand = lambda a: names[a] if isinstance(a, fx.Node) else a  # noqa: E731
        _check_broadcast(node, roles, full)
        if kind_of(node) == "reduction":
            lines += reduction_lines(node, var, operand)
        else:
            lines.append(f"    {var} = {node_value(node, operand)}")
        names[node], roles[node] = var, _role(node, full)
    outputs = [(n, roles[n]) for n in group.outputs]
    for i, (node, role) in enumerate(outputs):
        if role not in ("full", "row"):
            raise Unsupported(f"{node.name}: an output of role {role}")
        lines.append(_store(f"out{i}", names[node], role, float_value(node, "row").dtype))
    params = ", ".join([f"in{i}_ptr" for i in range(len(inputs))] + [f"out{i}_ptr" for i in range(len(outputs))]
                       + ["D"] + extra)
    body = "\n".join(lines)
    header = "\n".join(f"#   {n.target}" for n in group.nodes if kind_of(n) != "free")
    source = (f"# generated by slimfx codegen/emit_rows.py for a group of the ops:\n{header}\n"
              "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
              f"def kernel({params}, BLOCK: tl.constexpr):\n"
              # int64: row * D in int32 wraps past 2^31 elements (logits of 49,152 columns: 43,690 rows)
              "    row = tl.program_id(0).to(tl.int64)\n    cols = tl.arange(0, BLOCK)\n    m = cols < D\n"
              f"{body}\n")
    kernel = RowKernel("rows", source, inputs, outputs, list(group.nodes), full=_full_node(group))
    kernel.check_shapes()  # an output size no input determines: Unsupported now, not at each call
    return kernel


def _load(var: str, role: str, lead: int, dtype: torch.dtype, per_row: bool = False) -> str:
    if role == "bcast" and per_row:  # the same value across the row: one load, a scalar
        offset = " + ".join([f"c{j} * {var}_s{j}" for j in range(lead)] or ["0"])
        load = f"tl.load({var}_ptr + {offset})"
    elif role == "bcast":
        offset = " + ".join([f"c{j} * {var}_s{j}" for j in range(lead)] + [f"cols * {var}_s{lead}"])
        load = f"tl.load({var}_ptr + {offset}, mask=m, other=0.0)"
    else:
        load = {
            "full": f"tl.load({var}_ptr + row * D + cols, mask=m, other=0.0)",
            "row": f"tl.load({var}_ptr + row)",
            "col": f"tl.load({var}_ptr + cols, mask=m, other=0.0)",
            "scalar": f"tl.load({var}_ptr)",
        }[role]
    return f"    {var} = {widened(load, dtype)}"


def _store(var: str, value: str, role: str, dtype: torch.dtype) -> str:
    if role == "full":
        # A row value stored at full shape is broadcast first (0 * cols keeps the block shape).
        full = narrowed(f"{value} + tl.zeros([BLOCK], tl.float32)", dtype)
        return f"    tl.store({var}_ptr + row * D + cols, {full}, mask=m)"
    return f"    tl.store({var}_ptr + row, {narrowed(value, dtype)})"


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _shape(node: fx.Node) -> tuple[str, ...]:
    return tuple(str(s) for s in float_value(node, "row").shape)


def _full_node(group: Group) -> fx.Node:
    return group.reduction.args[0] if group.reduction is not None else next(
        n for n in group.nodes if kind_of(n) != "free")


def _full_shape(group: Group) -> tuple[str, ...]:
    return _shape(_full_node(group))


def _check_broadcast(node: fx.Node, roles: dict[fx.Node, str], full: tuple[str, ...]) -> None:
    """A value shaped like the rows without their last dim ([R] against [R, D]) is read one per
    row; torch broadcasts it along the last dim instead (as a column, which needs R == D), when
    an op meets it with a wider value. `sq[:, None] + sq` (pairwise distances) was computed per
    row: Unsupported, so the group runs eager. Likewise a column ([D], or any shape broadcast
    along the rows) meeting such an [R] value into an [R] result: torch lines it up with R, not
    with D (`exp(x).sum(-1) * w`, x [B, 4, 4], w [4])."""
    if len(full) < 2:
        return
    for a in node.all_input_nodes:
        if roles.get(a) == "row" and _shape(a) == full[:-1] and _shape(node) != full[:-1]:
            raise Unsupported(f"{node.name}: {a.name} {list(_shape(a))} meets values of {list(full)}, which "
                              "broadcasts it along the last dim, not one value per row")
        if roles.get(a) in ("col", "bcast") and _shape(node) == full[:-1]:
            raise Unsupported(f"{node.name}: {a.name} {list(_shape(a))} meets a value of the rows' shape "
                              f"{list(full[:-1])}, which lines it up with the rows, not the columns")


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
    if full and len(shape) <= len(full) and all(s in ("1", f) for s, f in zip(reversed(shape), reversed(full))):
        return "bcast"
    raise Unsupported(f"{node.name} {shape} against the group's rows {full}")
