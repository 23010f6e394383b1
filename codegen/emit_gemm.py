"""The GEMM template: one anchor of a GEMM group of partition.py — `slimfx::quant_linear`,
`aten.linear` (its weight possibly a `slimfx::dequantize` prologue), `aten.mm`, `aten.addmm` or
`aten.matmul` by a 2-D weight — with
its pointwise epilogue, as one Triton kernel (float32 activations).

- Tiles of [BM, BN] outputs, a loop over K in steps of BK. A packed weight (runtime/formats.py:
  `8 // bits` codes per byte along the input dim, little end first; fp16 scales per group of
  `group` inputs, the last group possibly shorter; zeros per group or the implicit middle code) is
  dequantized tile by tile in registers — `(code - zero) * scale` — and never written out.
- The epilogue runs on the accumulator before the one store: bias, then the group's pointwise
  ops (codegen/expr.py's table), whose other operands are read as "full" ([M, N]), "col" ([N]:
  bias-like), "row" ([M, 1]) or "scalar" values, by their symbolic shapes.
- Only reshapes may sit between the anchor and its epilogue (codegen/ops.py `keeps_order`); a
  transposing view, another dtype or an unknown op raises Unsupported naming the node (the caller
  then keeps the anchor alone, or the eager ops).

GEMMs merged horizontally by the partitioner (q/k/v, gate/up) are emitted one anchor at a time
(codegen/emit.py splits them); a kernel over concatenated weights is not written yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import sympy
import torch
from torch import fx

from .expr import Unsupported, expression
from .kernel import Kernel, float32_only, tensor_val
from .ops import keeps_order, kind_of
from .partition import Group

__all__ = ["GemmKernel", "emit_gemm", "block_sizes"]

aten = torch.ops.aten
QUANT = torch.ops.slimfx.quant_linear.default
DEQUANT = torch.ops.slimfx.dequantize.default
_QUANT_ARGS = tuple(a.name for a in QUANT._schema.arguments)
_DEQUANT_ARGS = tuple(a.name for a in DEQUANT._schema.arguments)


def block_sizes(m: int, n: int, k: int, interpreted: bool) -> tuple[int, int, int]:
    """(BM, BN, BK) for one call. tl.dot needs 16 or more on each side. Under the interpreter
    (numpy, one program at a time) fewer, larger programs are faster; on a GPU these are a fixed
    first choice — autotuning per shape is not written yet."""
    if interpreted:
        return 16, 64, 64
    bm = 16 if m <= 16 else 64
    return bm, 64, 64


@dataclass
class GemmKernel(Kernel):
    n: int = 0
    k: int = 0
    quant: Optional[tuple[int, int]] = None  # (bits, group) of a packed weight, None for a dense one
    weight_layout: str = "nk"  # "nk": weight [N, K] (linear); "kn": [K, N] (mm)
    roles: list[str] = field(default_factory=list)  # per input: x, qweight, scales, zeros, w, bias, full, col, row, scalar

    def launch(self, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        import triton

        from triton import knobs

        x = values[0]
        if x.dtype != torch.float32:
            raise TypeError(f"{self.name}: input of dtype {x.dtype}, the kernel is float32")
        x2 = x.reshape(-1, self.k)
        m = x2.shape[0]
        shapes = self.output_shapes(values)
        outs = [torch.empty(shape, dtype=torch.float32, device=x.device) for shape in shapes]
        if m == 0 or self.n == 0:
            return outs
        args, strides = [x2], [x2.stride(0), x2.stride(1)]
        for value, role in zip(values[1:], self.roles[1:]):
            if role == "w":  # read through its strides (an mm's weight is often a transposed view)
                args.append(value)
                strides += [value.stride(0), value.stride(1)] if self.weight_layout == "nk" else \
                    [value.stride(1), value.stride(0)]
            else:
                args.append(value.contiguous())
        bm, bn, bk = block_sizes(m, self.n, self.k, bool(knobs.runtime.interpret))
        grid = (triton.cdiv(m, bm), triton.cdiv(self.n, bn))
        self.compile()[grid](*args, *outs, m, self.n, self.k, *strides, BM=bm, BN=bn, BK=bk)
        return outs


def emit_gemm(group: Group) -> GemmKernel:
    """Triton source for a GEMM group with one anchor (module doc)."""
    if group.kind != "gemm" or len(group.anchors) != 1:
        raise Unsupported("the GEMM template takes a group with one anchor (codegen/emit.py splits merged ones)")
    anchor = group.anchor
    out_val = float32_only(anchor, "GEMM")
    x, weight, bias, weight_layout = _operands(anchor, group)
    float32_only(x, "GEMM")
    n, k = _static(out_val.shape[-1], anchor), _static(tensor_val(x).shape[-1], x)
    m_expr = _numel(out_val.shape[:-1])

    inputs: list[tuple[fx.Node, str]] = [(x, "x")]
    lines = []
    if weight[0] == "quant":
        _, qweight, scales, zeros, bits, group_size = weight
        inputs += [(qweight, "qweight"), (scales, "scales")] + ([(zeros, "zeros")] if zeros is not None else [])
        quant = (bits, group_size)
        lines += _quant_tile(bits, group_size, zeros is not None)
    else:
        w = weight[1]
        float32_only(w, "GEMM")
        inputs.append((w, "w"))
        quant = None
        lines.append("        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :] * stride_wk, "
                     "mask=mn[:, None] & mk[None, :], other=0.0)")
    names: dict[fx.Node, str] = {anchor: "acc"}
    epilogue = []
    if bias is not None:
        var, role = f"e{len(inputs)}", _role(bias, n, m_expr)
        inputs.append((bias, role))
        epilogue += [_load(var, role), f"    acc = acc + {var}"]

    def operand(a):
        if not isinstance(a, fx.Node):
            return repr(a) if not isinstance(a, bool) else str(a)
        if a not in names:
            role = _role(a, n, m_expr)
            var = f"e{len(inputs)}"
            inputs.append((a, role))
            epilogue.append(_load(var, role))
            names[a] = var
        return names[a]

    tail = [nd for nd in group.nodes if nd is not anchor and kind_of(nd) != "prologue"]
    for i, node in enumerate(tail):
        if kind_of(node) == "free":
            if not keeps_order(node):
                raise Unsupported(f"{node.name} ({node.target}) reorders the GEMM's output")
            src = node.all_input_nodes[0]
            if src not in names or _role(node, n, m_expr) != "full":
                raise Unsupported(f"{node.name} ({node.target}) changes the GEMM output's shape")
            names[node] = names[src]
            continue
        if kind_of(node) != "pointwise":
            raise Unsupported(f"{node.name} ({node.target}) in a GEMM epilogue")
        float32_only(node, "GEMM")
        if _role(node, n, m_expr) != "full":
            raise Unsupported(f"{node.name}: an epilogue value that is not the GEMM's [M, N]")
        var = f"t{i}"
        epilogue.append(f"    {var} = {expression(node, operand)}")
        names[node] = var
    outputs = [(nd, "full") for nd in group.outputs]
    for nd, _ in outputs:
        if nd not in names:
            raise Unsupported(f"{nd.name}: a GEMM group output outside the epilogue chain")
        if _role(nd, n, m_expr) != "full":
            raise Unsupported(f"{nd.name}: an output that is not the GEMM's [M, N]")
    stores = [f"    tl.store(out{i}_ptr + rm[:, None] * N + rn[None, :], {names[nd]}, mask=mo)"
              for i, (nd, _) in enumerate(outputs)]
    source = _source(inputs, outputs, lines, epilogue, stores, quant)
    return GemmKernel("gemm", source, inputs, outputs, list(group.nodes), n=n, k=k, quant=quant,
                      weight_layout=weight_layout,
                      roles=[r for _, r in inputs])


def _source(inputs, outputs, tile_lines, epilogue, stores, quant) -> str:
    params = []
    for i, (_, role) in enumerate(inputs):
        params.append({"x": "x_ptr", "qweight": "qw_ptr", "scales": "s_ptr", "zeros": "z_ptr",
                       "w": "w_ptr"}.get(role, f"e{i}_ptr"))
    params += [f"out{i}_ptr" for i in range(len(outputs))]
    strides = "stride_xm, stride_xk" + (", stride_wn, stride_wk" if quant is None else "")
    what = "dense weight" if quant is None else f"int{quant[0]} weight, groups of {quant[1]}"
    return (f"# generated by slimfx codegen/emit_gemm.py: GEMM ({what}) with its epilogue\n"
            "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
            f"def kernel({', '.join(params)}, M, N, K, {strides}, BM: tl.constexpr, BN: tl.constexpr, "
            "BK: tl.constexpr):\n"
            "    rm = tl.program_id(0) * BM + tl.arange(0, BM)\n"
            "    rn = tl.program_id(1) * BN + tl.arange(0, BN)\n"
            "    mm = rm < M\n    mn = rn < N\n    mo = mm[:, None] & mn[None, :]\n"
            "    acc = tl.zeros((BM, BN), dtype=tl.float32)\n"
            + ("" if quant is None else
               f"    KB = (K * {quant[0]} + 7) // 8  # bytes per packed row\n"
               f"    GROUP = {quant[1]}\n    NG = (K + GROUP - 1) // GROUP  # groups per row (the last may be short)\n")
            + "    for k0 in range(0, K, BK):\n"
            "        kk = k0 + tl.arange(0, BK)\n        mk = kk < K\n"
            "        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, "
            "mask=mm[:, None] & mk[None, :], other=0.0)\n"
            + "\n".join(tile_lines) + "\n"
            "        acc += tl.dot(a, tl.trans(w), input_precision=\"ieee\")\n"
            + "\n".join(epilogue + stores) + "\n")


def _quant_tile(bits: int, group: int, zeros: bool) -> list[str]:
    """Dequantize the [BN, BK] weight tile: codes from the packed bytes, group scales (and zeros)."""
    per = 8 // bits
    zero = ("tl.load(z_ptr + rn[:, None] * NG + kk[None, :] // GROUP, mask=mw, other=0.0).to(tl.float32)"
            if zeros else f"{float(1 << (bits - 1))!r}")
    return [
        "        mw = mn[:, None] & mk[None, :]",
        f"        byte = tl.load(qw_ptr + rn[:, None] * KB + kk[None, :] // {per}, mask=mw, other=0).to(tl.int32)",
        f"        code = (byte >> ((kk[None, :] % {per}) * {bits})) & {(1 << bits) - 1}",
        "        scale = tl.load(s_ptr + rn[:, None] * NG + kk[None, :] // GROUP, mask=mw, other=0.0).to(tl.float32)",
        f"        w = (code.to(tl.float32) - {zero}) * scale",
    ]


def _operands(anchor: fx.Node, group: Group):
    """(x, weight, bias, weight layout); weight is ("quant", qweight, scales, zeros, bits, group)
    or ("dense", w)."""
    if anchor.target is QUANT:
        a = _args(anchor, _QUANT_ARGS)
        return a["x"], ("quant", a["qweight"], a["scales"], a["zeros"], a["bits"], a["group"]), a["bias"], "nk"
    if anchor.target is aten.linear.default:
        x, w = anchor.args[0], anchor.args[1]
        bias = anchor.args[2] if len(anchor.args) > 2 else anchor.kwargs.get("bias")
        if isinstance(w, fx.Node) and w.target is DEQUANT and w in group.nodes:
            d = _args(w, _DEQUANT_ARGS)
            return x, ("quant", d["qweight"], d["scales"], d["zeros"], d["bits"], d["group"]), bias, "nk"
        return x, ("dense", w), bias, "nk"
    if anchor.target in (aten.mm.default, aten.matmul.default):  # matmul: by a 2-D weight (codegen/ops.py)
        return anchor.args[0], ("dense", anchor.args[1]), None, "kn"
    if anchor.target is aten.addmm.default:
        if anchor.kwargs.get("beta", 1) != 1 or anchor.kwargs.get("alpha", 1) != 1:
            raise Unsupported(f"{anchor.name}: addmm with beta or alpha other than 1")
        return anchor.args[1], ("dense", anchor.args[2]), anchor.args[0], "kn"
    raise Unsupported(f"{anchor.name}: no GEMM template for {anchor.target}")


def _args(node: fx.Node, names: tuple[str, ...]) -> dict:
    out = dict(zip(names, node.args))
    for name in names[len(node.args):]:
        out[name] = node.kwargs.get(name)
    return out


def _static(size, node: fx.Node) -> int:
    if isinstance(size, torch.SymInt):
        raise Unsupported(f"{node.name}: a GEMM whose N or K is symbolic ({size})")
    return int(size)


def _numel(shape) -> sympy.Expr:
    total = sympy.Integer(1)
    for s in shape:
        total *= s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(int(s))
    return sympy.expand(total)


def _role(node: fx.Node, n: int, m_expr: sympy.Expr) -> str:
    """How an epilogue operand lines up with the GEMM's [M, N] output (module doc)."""
    val = float32_only(node, "GEMM")
    shape = val.shape
    last = shape[-1] if len(shape) else 1
    lead = _numel(shape[:-1]) if len(shape) else sympy.Integer(1)
    if last == n and sympy.expand(lead - m_expr) == 0:
        return "full"
    if last == n and lead == 1:
        return "col"
    if last == 1 and sympy.expand(lead - m_expr) == 0:
        return "row"
    if (lead == 1 and last == 1) or len(shape) == 0:
        return "scalar"
    raise Unsupported(f"{node.name} {tuple(shape)} does not line up with the GEMM's [M={m_expr}, N={n}]")


def _load(var: str, role: str) -> str:
    return {
        "full": f"    {var} = tl.load({var}_ptr + rm[:, None] * N + rn[None, :], mask=mo, other=0.0)",
        "col": f"    {var} = tl.load({var}_ptr + rn[None, :], mask=mn[None, :], other=0.0)",
        "row": f"    {var} = tl.load({var}_ptr + rm[:, None], mask=mm[:, None], other=0.0)",
        "scalar": f"    {var} = tl.load({var}_ptr)",
    }[role]
