"""The GEMM template: a GEMM group of partition.py — anchors `slimfx::quant_linear`, `aten.linear`
(its weight possibly a `slimfx::dequantize` prologue), `aten.mm`, `aten.addmm` or `aten.matmul` by
a 2-D weight — with its pointwise epilogue, as one Triton kernel (float32, float16 or bfloat16
activations; codegen/dtypes.py says how each is read, multiplied and rounded).

- Tiles of [BM, BN] outputs, a loop over K in steps of BK; each step's products on the tensor
  cores (tl.dot, tiles of 16 or more on each side) or, when the launch config sets GEMV, as a
  broadcast product summed on the CUDA cores (row tiles of 1-4 for decode steps: `_product`).
  A packed weight (runtime/formats.py: `8 // bits` codes per byte along the input dim, little
  end first; fp16 scales per group of `group` inputs, the last group possibly shorter; zero
  points per group — packed whole ones (uint8, `bits` bits each along the group axis, extracted
  like the codes), float ones, or the implicit middle code) is dequantized tile by tile in
  registers — `(code - zero) * scale` — and never written out; each step loads its bytes,
  scales and zero points once (codegen/gemm_dequant.py).
- The epilogue runs on the accumulator before the one store: bias, then the group's pointwise
  ops (codegen/expr.py's table), whose other operands are read as "full" ([M, N]), "col" ([N]:
  bias-like), "row" ([M, 1]) or "scalar" values, by their symbolic shapes.
- Only reshapes may sit between the anchor and its epilogue (codegen/ops.py `keeps_order`); a
  transposing view, a weight of another dtype than the input or an unknown op raises Unsupported
  naming the node (the caller then keeps the anchor alone, or the eager ops). So does a bfloat16
  GEMM under Triton's interpreter, which keeps bfloat16 as raw 16-bit integers and would multiply
  those in `tl.dot`: on a CPU such a GEMM stays an eager op; on a GPU it is a kernel.

- GEMMs the partitioner merged because they read one input in one weight format are one kernel:
  anchors of one width are computed together, one accumulator each over the same loaded input
  tile, and their epilogue may mix them (gate and up with the SwiGLU product: one store);
  anchors of different widths (q/k/v under GQA) are segments, each program's column tile
  choosing its segment, each with its own epilogue — anchors of one width whose epilogue mixes
  them (gate and up beside q/k/v: Cohere's parallel block) one segment. An epilogue that reads
  another segment's value (`up(x) * gate(x)`, gate [M, 1]) is refused: that value is not in
  memory while the kernel runs. A merged group the template refuses is split back into one
  kernel per anchor by codegen/emit.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import sympy
import torch
from torch import fx

from .dtypes import dot, float_value, narrowed, rounded, widened
from .expr import Unsupported, node_value
from .gemm_dequant import quant_tile, zero_kind
from .kernel import Kernel, tensor_val
from .kernel import interpreted as _interpreted  # `interpreted` is launch's local name
from .ops import keeps_order, kind_of
from .partition import Group
from .tuning import autotuned, gemm_configs, m_bucket, tuning_enabled

__all__ = ["GemmKernel", "emit_gemm", "block_sizes", "owners"]

aten = torch.ops.aten
QUANT = torch.ops.slimfx.quant_linear.default
DEQUANT = torch.ops.slimfx.dequantize.default
_QUANT_ARGS = tuple(a.name for a in QUANT._schema.arguments)
_DEQUANT_ARGS = tuple(a.name for a in DEQUANT._schema.arguments)


def block_sizes(m: int, interpreted: bool) -> tuple[int, int, int]:
    """(BM, BN, BK) for one call. tl.dot needs 16 or more on each side. Under the interpreter
    (numpy, one program at a time) fewer, larger programs are faster; on a GPU this is the choice
    when autotuning is off (SLIMFX_AUTOTUNE=0; codegen/tuning.py has the tuned candidates)."""
    if interpreted:
        return 16, 64, 64
    return (16 if m <= 16 else 64), 64, 64


@dataclass
class GemmKernel(Kernel):
    k: int = 0
    ns: tuple[int, ...] = ()  # output width of each anchor
    segments: tuple[tuple[int, ...], ...] = ()  # anchors computed together (indexes into ns)
    weight_layouts: tuple[str, ...] = ()  # per anchor: "nk" (weight [N, K], linear) or "kn" ([K, N], mm)
    lora_width: int = 0  # the widest LoRA rank as the source pads it (0: no LoRA path); tuning.gemm_configs

    @property
    def roles(self) -> list[str]:
        """Per input: x, qweight, scales, zeros, w, lora_a, lora_b, or an operand's full/col/row/scalar."""
        return [r for _, r in self.inputs]

    def launch(self, values: Sequence[torch.Tensor], config: dict | None = None) -> list[torch.Tensor]:
        """The kernel on `values` (the inputs' tensors, in order). `config` (one of
        codegen/tuning.py's gemm_configs) forces a launch configuration, untimed; otherwise it is
        autotuned or the fixed choice (codegen/tuning.py's module doc)."""
        self.check_dtypes(values)
        x = values[0]
        x2 = x.reshape(-1, self.k)
        m = x2.shape[0]
        device = x.device
        outs = [torch.empty(shape, dtype=dtype, device=device)
                for shape, dtype in zip(self.output_shapes(values), self.output_dtypes())]
        if m == 0 or not any(self.ns):
            return outs
        args, strides, dense = [x2], [x2.stride(0), x2.stride(1)], 0
        for value, (_, role) in zip(values[1:], self.inputs[1:]):
            if role == "w":  # read through its strides (an mm's weight is often a transposed view)
                layout = self.weight_layouts[dense]  # merged anchors share a format: all dense here
                strides += [value.stride(0), value.stride(1)] if layout == "nk" else [value.stride(1), value.stride(0)]
                args.append(value)
                dense += 1
            else:
                args.append(value.contiguous())
        interpreted = _interpreted()
        sizes = (*args, *outs, m, self.k, *self.ns, *strides)
        if config is not None:
            meta = config["kwargs"]
            self.compile()[self._grid(m, meta["BM"], meta["BN"])](*sizes, **meta, num_warps=config["num_warps"],
                                                                   num_stages=config["num_stages"])
            return outs
        if not tuning_enabled(interpreted):
            bm, bn, bk = block_sizes(m, interpreted)
            self.compile()[self._grid(m, bm, bn)](*sizes, BM=bm, BN=bn, BK=bk, GEMV=False)
            return outs
        bucket = m_bucket(m)  # K and the Ns, the rest of the tuner's key, are the kernel's own
        self.launch_tuned(("gemm", bucket), lambda: autotuned(
            self.compile(), gemm_configs(bucket, self.lora_width), ["K", *[f"N{j}" for j in range(len(self.ns))]], interpreted),
            lambda meta: self._grid(m, meta["BM"], meta["BN"]), sizes, {})
        return outs

    def _grid(self, m: int, bm: int, bn: int) -> tuple[int, int]:
        """Programs: row tiles × the column tiles of every segment."""
        return -(-m // bm), sum(-(-self.ns[seg[0]] // bn) for seg in self.segments)


def owners(group: Group) -> dict[fx.Node, fx.Node]:
    """Each node of a GEMM group -> the anchor it belongs to: an anchor itself, a prologue its
    reader, an epilogue node the latest anchor (graph order) it depends on inside the group."""
    anchors = sorted(group.anchors, key=group.nodes.index)
    owner: dict[fx.Node, fx.Node] = {a: a for a in anchors}
    inside = set(group.nodes)
    for base, (a, b) in group.lora.items():  # a LoRA path belongs to its base linear
        owner[a] = owner[b] = base
        if a.args[0] in inside:
            owner[a.args[0]] = base  # its dropout
    for node in group.nodes:  # graph order: a node's in-group inputs are assigned before it
        if node in owner:
            continue
        if kind_of(node) == "prologue":
            owner[node] = next(u for u in node.users if u in owner)
            continue
        sources = [owner[a] for a in node.all_input_nodes if a in inside and a in owner]
        owner[node] = max(sources, key=anchors.index) if sources else anchors[-1]
    return owner


def emit_gemm(group: Group) -> GemmKernel:
    """Triton source for a GEMM group: one anchor, or several reading one input (module doc)."""
    if group.kind != "gemm" or not group.anchors:
        raise Unsupported("the GEMM template takes a GEMM group")
    kernel = _GemmSource(group).build()
    kernel.check_shapes()
    return kernel


class _GemmSource:
    def __init__(self, group: Group):
        self.group = group
        self.anchors = sorted(group.anchors, key=group.nodes.index)
        self.owner = owners(group)
        self.inputs: list[tuple[fx.Node, str]] = []
        self.names: dict[fx.Node, str] = {}  # value -> its variable, within the segment being written
        self.stored: set[fx.Node] = set()

    def build(self) -> GemmKernel:
        parts = [_operands(a, self.group) for a in self.anchors]
        xs = {p[0] for p in parts}
        if len(xs) != 1:
            raise Unsupported(f"{self.anchors[0].name}: merged GEMMs that read different inputs")
        x = parts[0][0]
        self.dtype = float_value(x, "GEMM").dtype
        if self.dtype == torch.bfloat16 and _interpreted():
            raise Unsupported(f"{self.anchors[0].name}: a bfloat16 GEMM under Triton's interpreter, whose tl.dot "
                              "multiplies bfloat16 tiles as raw integers (a GPU runs it as a kernel)")
        self.k = _static(tensor_val(x).shape[-1], x)
        ns = [_static(float_value(a, "GEMM").shape[-1], a) for a in self.anchors]
        self.m_expr = _numel(tensor_val(self.anchors[0]).shape[:-1])
        formats = {p[1][0] if p[1][0] == "dense" else p[1][4:] for p in parts}
        if len(formats) != 1:
            raise Unsupported(f"{self.anchors[0].name}: merged GEMMs with different weight formats")
        self.quant = None if parts[0][1][0] == "dense" else tuple(parts[0][1][4:])
        zero_kinds = [zero_kind(p[1][3]) for p in parts if p[1][0] == "quant"]
        self.inputs.append((x, "x"))
        weight_args = []
        self.ranks: dict[int, int] = {}
        for j, (_, weight, _, _) in enumerate(parts):
            if weight[0] == "quant":
                _, qweight, scales, zeros, _, _ = weight
                self.inputs += [(qweight, "qweight"), (scales, "scales")] + ([(zeros, "zeros")] if zeros is not None else [])
                weight_args += [f"qw{j}_ptr", f"s{j}_ptr"] + ([f"z{j}_ptr"] if zeros is not None else [])
            else:
                self._same_dtype(weight[1])
                self.inputs.append((weight[1], "w"))
                weight_args.append(f"w{j}_ptr")
            if self.anchors[j] in self.group.lora:
                a_w, b_w = self._lora_weights(self.anchors[j], x)
                self.inputs += [(a_w, "lora_a"), (b_w, "lora_b")]
                weight_args += [f"la{j}_ptr", f"lb{j}_ptr"]
                self.ranks[j] = _static(tensor_val(a_w).shape[0], a_w)
        segments = self._segments(ns)
        outputs = [(nd, "full") for nd in self.group.outputs]
        self.out_index = {nd: i for i, (nd, _) in enumerate(outputs)}
        body = []
        for s, seg in enumerate(segments):
            body += self._segment(s, seg, segments, parts, ns)
        for nd, _ in outputs:
            if nd not in self.stored:
                raise Unsupported(f"{nd.name}: a GEMM group output outside the epilogue chains")
        params = ["x_ptr", *weight_args, *[f"e{i}_ptr" for i, (_, r) in enumerate(self.inputs) if r in _OPERAND_ROLES],
                  *[f"out{i}_ptr" for i in range(len(outputs))], "M", "K", *[f"N{j}" for j in range(len(ns))],
                  "stride_xm", "stride_xk",
                  *[f"stride_w{j}{d}" for j, p in enumerate(parts) if p[1][0] == "dense" for d in "nk"]]
        what = "dense weight" if self.quant is None else f"int{self.quant[0]} weight, groups of {self.quant[1]}"
        many = f", {len(ns)} GEMMs reading one input" if len(ns) > 1 else ""
        source = (f"# generated by slimfx codegen/emit_gemm.py: GEMM ({what}{many}) with its epilogue\n"
                  "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
                  f"def kernel({', '.join(params)}, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GEMV: tl.constexpr):\n"
                  "    rm = tl.program_id(0) * BM + tl.arange(0, BM)\n    mm = rm < M\n    tile = tl.program_id(1)\n"
                  + ("" if self.quant is None else self._packed_sizes("packed" in zero_kinds))
                  + "\n".join(body) + "\n")
        return GemmKernel("gemm", source, self.inputs, outputs, list(self.group.nodes), k=self.k, ns=tuple(ns),
                          segments=tuple(segments), weight_layouts=tuple(p[3] for p in parts),
                          lora_width=max((_padded(r) for r in self.ranks.values()), default=0))

    def _segments(self, ns: list[int]) -> list[tuple[int, ...]]:
        """Anchors computed together (indexes into self.anchors). Anchors of one width are one
        segment (their epilogue may mix them: SwiGLU). Of different widths, each program's column
        tile chooses its segment: an anchor is a segment of its own, unless an epilogue node of one
        anchor reads a value of another anchor of its width (gate and up beside q/k/v of other
        widths, Cohere's parallel block): those two are one segment. A read across widths is
        refused in `_load`."""
        if len(set(ns)) == 1:
            return [tuple(range(len(ns)))]
        index = {a: j for j, a in enumerate(self.anchors)}
        root = list(range(len(ns)))

        def find(j: int) -> int:
            while root[j] != j:
                j = root[j]
            return j

        for node in self.group.nodes:
            mine = index[self.owner[node]]
            for a in node.all_input_nodes:
                theirs = index.get(self.owner.get(a))
                if theirs is not None and ns[theirs] == ns[mine]:
                    root[find(theirs)] = find(mine)
        together: dict[int, list[int]] = {}
        for j in range(len(ns)):
            together.setdefault(find(j), []).append(j)
        return [tuple(seg) for seg in sorted(together.values())]

    def _packed_sizes(self, packed_zeros: bool) -> str:
        """The packed layout's row sizes as constants of the source (K is the group's own): a
        constant lets the compiler see that rows of bytes line up, and vectorize their loads."""
        bits, group = self.quant
        ng = -(-self.k // group)
        return (f"    KB = {-(-self.k * bits // 8)}  # bytes per packed row\n"
                f"    GROUP = {group}\n    NG = {ng}  # groups per row (the last may be short)\n"
                + (f"    ZB = {-(-ng * bits // 8)}  # bytes per row of packed zero points\n" if packed_zeros else ""))

    def _segment(self, s: int, seg: tuple[int, ...], segments, parts, ns) -> list[str]:
        """The code of one segment: its tiles of columns, the K loop, its epilogue and stores."""
        n = ns[seg[0]]
        first = " + ".join(f"tl.cdiv(N{segments[t][0]}, BN)" for t in range(s)) or "0"
        self.names = {}
        lines = [f"    start{s} = {first}  # the first column tile of this segment",
                 f"    if (tile >= start{s}) & (tile < start{s} + tl.cdiv(N{seg[0]}, BN)):",
                 f"        rn = (tile - start{s}) * BN + tl.arange(0, BN)",
                 f"        mn = rn < N{seg[0]}", "        mo = mm[:, None] & mn[None, :]"]
        lines += [f"        acc{j} = tl.zeros((BM, BN), dtype=tl.float32)" for j in seg]
        for j in seg:
            if j in self.ranks:  # x·Aᵀ of the LoRA path, [BM, rank padded to tl.dot's 16]
                lines += [f"        rr{j} = tl.arange(0, {_padded(self.ranks[j])})",
                          f"        xa{j} = tl.zeros((BM, {_padded(self.ranks[j])}), dtype=tl.float32)"]
        lines += ["        for k0 in range(0, K, BK):", "            kk = k0 + tl.arange(0, BK)", "            mk = kk < K",
                  "            a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, "
                  "mask=mm[:, None] & mk[None, :], other=0.0)"]
        for j in seg:
            weight = parts[j][1]
            lines += quant_tile(j, *weight[4:], zero_kind(weight[3]), self.dtype, self.k) if weight[0] == "quant" else [
                f"            w = tl.load(w{j}_ptr + rn[:, None] * stride_w{j}n + kk[None, :] * stride_w{j}k, "
                "mask=mn[:, None] & mk[None, :], other=0.0)"]
            lines += _product(f"acc{j}", "+=", "a", "w", self.dtype, "            ")
            if j in self.ranks:
                r = self.ranks[j]
                lines += [f"            la = tl.load(la{j}_ptr + rr{j}[:, None] * K + kk[None, :], "
                          f"mask=(rr{j}[:, None] < {r}) & mk[None, :], other=0.0)",
                          *_product(f"xa{j}", "+=", "a", "la", self.dtype, "            ")]
        for j in seg:
            if j in self.ranks:  # (x·Aᵀ)·Bᵀ for this tile: the rank path never leaves the registers
                r = self.ranks[j]
                lines += [f"        lb = tl.load(lb{j}_ptr + rn[:, None] * {r} + rr{j}[None, :], "
                          f"mask=mn[:, None] & (rr{j}[None, :] < {r}), other=0.0)",
                          *_product(f"lora{j}", "=", narrowed(f"xa{j}", self.dtype), "lb", self.dtype, "        ")]
                if self.dtype != torch.float32:  # the B linear's result, rounded as eager's is
                    lines.append(f"        lora{j} = {rounded(f'lora{j}', self.dtype)}")
        mine = {self.anchors[j] for j in seg}
        lora_nodes = {n for base in mine if base in self.group.lora for n in self._lora_nodes(base)}
        # The output's row offsets in int64, after the K loop (an int64 rm throughout spilled the GEMV
        # form's registers): rm * N in int32 wraps past 2^31 elements, an LM head's logits (49,152
        # wide) past 43,690 rows. x's rows (K wide) stay int32.
        epilogue: list[str] = ["rw = rm.to(tl.int64)[:, None]"]
        for j in seg:
            self.names[self.anchors[j]] = f"acc{j}"
            bias = parts[j][2]
            if bias is not None:
                if bias not in self.names:
                    epilogue += self._load(bias, n, f"N{seg[0]}")
                # in the input's dtype, as quant_linear's eager meaning casts it (a no-op for linear)
                epilogue.append(f"acc{j} = acc{j} + {rounded(self.names[bias], self.dtype)}")
            if self.dtype != torch.float32:  # the anchor's result, rounded once as eager's is
                epilogue.append(f"acc{j} = {rounded(f'acc{j}', float_value(self.anchors[j], 'GEMM').dtype)}")
        for j in seg:
            if j in self.ranks:
                self.names[self.group.lora[self.anchors[j]][1]] = f"lora{j}"
        nodes = [nd for nd in self.group.nodes if self.owner[nd] in mine and nd not in mine
                 and nd not in lora_nodes and kind_of(nd) != "prologue"]
        for i, node in enumerate(nodes):
            if kind_of(node) == "free":
                if not keeps_order(node):
                    raise Unsupported(f"{node.name} ({node.target}) reorders the GEMM's output")
                src = node.all_input_nodes[0]
                if src not in self.names or _role(node, n, self.m_expr) != "full":
                    raise Unsupported(f"{node.name} ({node.target}) changes the GEMM output's shape")
                self.names[node] = self.names[src]
                continue
            if kind_of(node) != "pointwise":
                raise Unsupported(f"{node.name} ({node.target}) in a GEMM epilogue")
            if _role(node, n, self.m_expr) != "full":
                raise Unsupported(f"{node.name}: an epilogue value that is not the GEMM's [M, N]")
            for a in node.all_input_nodes:
                if a not in self.names:
                    epilogue += self._load(a, n, f"N{seg[0]}")
            var = f"t{s}_{i}"
            epilogue.append(f"{var} = {node_value(node, lambda a: self.names[a] if isinstance(a, fx.Node) else a)}")
            self.names[node] = var
        stores = []
        for nd in self.group.outputs:
            if self.owner[nd] in mine:
                if _role(nd, n, self.m_expr) != "full":
                    raise Unsupported(f"{nd.name}: an output that is not the GEMM's [M, N]")
                out = narrowed(self.names[nd], float_value(nd, "GEMM").dtype)
                stores.append(f"tl.store(out{self.out_index[nd]}_ptr + rw * N{seg[0]} + rn[None, :], {out}, mask=mo)")
                self.stored.add(nd)
        return lines + [f"        {line}" for line in epilogue + stores]

    def _lora_nodes(self, base: fx.Node) -> list[fx.Node]:
        a, b = self.group.lora[base]
        return [a, b] + ([a.args[0]] if a.args[0] in self.group.nodes else [])

    def _lora_weights(self, base: fx.Node, x: fx.Node) -> tuple[fx.Node, fx.Node]:
        """The A [r, K] and B [N, r] weights of `base`'s adapter, whose path must read x (through
        an inference-mode dropout at most) and have no biases."""
        a, b = self.group.lora[base]
        src = a.args[0]
        if src is not x and not (src in self.group.nodes and src.target is aten.dropout.default
                                 and src.args[0] is x and src.args[2] is False):
            raise Unsupported(f"{a.name}: a LoRA path that does not read its base linear's input")
        for lin in (a, b):
            if lin.target is not aten.linear.default or (len(lin.args) > 2 and lin.args[2] is not None):
                raise Unsupported(f"{lin.name}: a LoRA linear with a bias or of another op ({lin.target})")
            self._same_dtype(lin.args[1])
        return a.args[1], b.args[1]

    def _same_dtype(self, weight: fx.Node) -> None:
        """A dense weight goes into tl.dot beside the input's tile: it must be in the same format."""
        dtype = float_value(weight, "GEMM").dtype
        if dtype != self.dtype:
            raise Unsupported(f"{weight.name}: a {dtype} weight for a {self.dtype} input")

    def _load(self, value: fx.Node, n: int, width: str) -> list[str]:
        """Read an epilogue operand from outside the group (once per segment that needs it). A
        value of the group another segment computes (`u * gate` with gate [M, 1] beside u [M, N])
        is not in memory when this segment runs: Unsupported, and the group is split."""
        if value in self.group.nodes:
            raise Unsupported(f"{value.name}: an epilogue operand another GEMM of the merged group "
                              "computes, of another width")
        role = _role(value, n, self.m_expr)
        # The input x or a weight may also be an epilogue operand: it is then passed twice.
        index = next((i for i, (v, r) in enumerate(self.inputs) if v is value and r in _OPERAND_ROLES), None)
        if index is None:
            index = len(self.inputs)
            self.inputs.append((value, role))
        var = f"e{index}"
        self.names[value] = var
        load = {
            "full": f"tl.load({var}_ptr + rw * {width} + rn[None, :], mask=mo, other=0.0)",
            "col": f"tl.load({var}_ptr + rn[None, :], mask=mn[None, :], other=0.0)",
            "row": f"tl.load({var}_ptr + rm[:, None], mask=mm[:, None], other=0.0)",
            "scalar": f"tl.load({var}_ptr)",
        }[role]
        return [f"{var} = {widened(load, float_value(value, 'GEMM').dtype)}"]


_OPERAND_ROLES = ("full", "col", "row", "scalar")


def _product(target: str, op: str, a: str, b: str, dtype: torch.dtype, indent: str) -> list[str]:
    """`target op a·bᵀ` for a tile `a` [BM, K'] and `b` [N', K'] (rows are output columns), both
    in `dtype`: tl.dot on the tensor cores, or — GEMV, a compile-time switch of the launch config
    — a broadcast product summed over K' on the CUDA cores, in float32 (products of two float16
    or bfloat16 values are exact in float32, so both sum the same products; only the order of the
    sum differs). tl.dot pads its row tile to 16 on the tensor cores; the GEMV form has no such
    floor, so a decode step (1-4 rows) can take row tiles of 1-4 and narrow column tiles, i.e.
    many programs over a narrow weight (module doc of codegen/tuning.py)."""
    return [f"{indent}if GEMV:",
            f"{indent}    {target} {op} tl.sum({widened(a, dtype)}[:, None, :] * {widened(b, dtype)}[None, :, :], axis=2)",
            f"{indent}else:",
            f"{indent}    {target} {op} {dot(a, f'tl.trans({b})', dtype)}"]


def _padded(rank: int) -> int:
    """A LoRA rank padded to a power of two of at least 16 (tl.dot's smallest side)."""
    return max(16, 1 << (rank - 1).bit_length())


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
    val = float_value(node, "GEMM")
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


