"""Random small graphs for the code generator's property tests: a pool of values starting from an
input x [B, D] and a weight, grown by pointwise ops, row reductions (kept dims), linears and layer
norms, captured with torch.export as the passes see graphs (aten ops with symbolic shapes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

D = 8
UNARY = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "neg": torch.neg, "silu": F.silu,
         "gelu": F.gelu, "exp_tanh": lambda v: torch.exp(torch.tanh(v))}
BINARY = {"add": torch.add, "mul": torch.mul, "sub": torch.sub}
ROWS = {"sum": lambda v: v.sum(-1, keepdim=True), "amax": lambda v: v.amax(-1, keepdim=True),
        "mean": lambda v: v.mean(-1, keepdim=True)}


class Program(torch.nn.Module):
    """Runs `steps`, each (op, operand indices) appending one value to the pool; returns the last two."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(D, D, generator=gen) / D ** 0.5)
        self.bias = torch.nn.Parameter(torch.randn(D, generator=gen))

    def forward(self, x):
        pool = [x]
        for op, args in self.steps:
            a = [pool[i] for i in args]
            if op in UNARY:
                pool.append(UNARY[op](a[0]))
            elif op in BINARY:
                pool.append(BINARY[op](a[0], a[1]))
            elif op in ROWS:
                pool.append(ROWS[op](a[0]))
            elif op == "softmax":
                pool.append(torch.softmax(a[0], dim=-1))
            elif op == "linear":
                pool.append(F.linear(a[0], self.weight, self.bias))
            elif op == "layer_norm":
                pool.append(F.layer_norm(a[0], (D,)))
        return pool[-1], pool[-2]


@st.composite
def programs(draw, max_steps: int = 10):
    """Steps whose operands have shapes that fit: [B, D] values, or [B, 1] after a reduction."""
    wide = [0]  # indices of [B, D] values
    narrow: list[int] = []  # [B, 1]
    steps = []
    for i in range(draw(st.integers(2, max_steps))):
        index = i + 1
        kind = draw(st.sampled_from(["unary", "binary", "rows", "softmax", "linear", "layer_norm"]))
        pool = wide + narrow
        if kind == "unary":
            src = draw(st.sampled_from(pool))
            steps.append((draw(st.sampled_from(sorted(UNARY))), (src,)))
            (wide if src in wide else narrow).append(index)
        elif kind == "binary":
            a, b = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
            steps.append((draw(st.sampled_from(sorted(BINARY))), (a, b)))
            (wide if a in wide or b in wide else narrow).append(index)
        elif kind == "rows":
            steps.append((draw(st.sampled_from(sorted(ROWS))), (draw(st.sampled_from(wide)),)))
            narrow.append(index)
        else:
            steps.append((kind, (draw(st.sampled_from(wide)),)))
            wide.append(index)
    return steps


def capture(steps, batch: int = 3, dtype: torch.dtype = torch.float32) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    model = Program(steps).eval().to(dtype)
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return ep.module(), x


EPILOGUES = {
    "none": lambda y, x: y,
    "silu": lambda y, x: F.silu(y),
    "gelu_tanh": lambda y, x: F.gelu(y, approximate="tanh"),
    "gelu_erf_scaled": lambda y, x: F.gelu(y) * 0.5,
    "relu_residual": lambda y, x: torch.relu(y) + x[..., : y.shape[-1]] if x.shape[-1] >= y.shape[-1] else torch.relu(y),
}


class QuantLinear(torch.nn.Module):
    """`slimfx::quant_linear` of a random packed weight (RTN), then an epilogue from EPILOGUES.
    `zero="float"` (with sym=False) stores float zero points; else asymmetric ones are packed."""

    def __init__(self, k: int, n: int, bits: int, group, sym: bool, bias: bool, epilogue: str, seed: int = 0,
                 zero: str = "int"):
        super().__init__()
        from slimfx.runtime.formats import QuantFormat, quantize_rtn
        from slimfx.runtime.ops import quant_linear_args

        gen = torch.Generator().manual_seed(seed)
        qw = quantize_rtn(torch.randn(n, k, generator=gen) / k ** 0.5, QuantFormat(bits, group, sym, zero))
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.bias = torch.nn.Parameter(torch.randn(n, generator=gen), requires_grad=False) if bias else None
        self.args = quant_linear_args(qw)
        self.epilogue = epilogue

    def forward(self, x):
        from slimfx.runtime.ops import quant_linear

        y = quant_linear(x, self.qweight, self.scales, self.zeros, self.bias, *self.args)
        return EPILOGUES[self.epilogue](y, x)


def capture_module(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """`model` exported with a dynamic batch (the first dim of x)."""
    ep = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    return ep.module()


class SharedInput(torch.nn.Module):
    """Several quant_linears reading one input, as the partitioner merges them: with `swiglu`,
    silu(first) * second (gate and up); else each output plus 1 (q/k/v with their own epilogues)."""

    def __init__(self, k: int, widths, bits: int = 4, group=16, sym: bool = True, swiglu: bool = False,
                 zeros=None):
        """`zeros`: each linear's zero-point kind ("int" or "float", with sym=False), or all "int"."""
        super().__init__()
        zeros = zeros or ["int"] * len(widths)
        self.linears = torch.nn.ModuleList(QuantLinear(k, n, bits, group, sym, False, "none", seed=i, zero=z)
                                           for i, (n, z) in enumerate(zip(widths, zeros)))
        self.swiglu = swiglu

    def forward(self, x):
        ys = [lin(x) for lin in self.linears]
        if self.swiglu:
            return F.silu(ys[0]) * ys[1]
        return tuple(y + 1.0 for y in ys)


def lowered_matches_eager(model: torch.nn.Module, x: torch.Tensor, *others: torch.Tensor):
    """`model` exported with a dynamic first dim, lowered (codegen/lower.py), and checked against
    the exported graph run eagerly on x and each of `others`; the lowering's summary."""
    from torch import fx

    from slimfx.codegen.lower import lower_graph

    ep = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("n")},))
    gm = ep.module()
    new, summary = lower_graph(gm.graph)
    lowered = fx.GraphModule(gm, new)
    with torch.no_grad():
        for inp in (x, *others):
            torch.testing.assert_close(lowered(inp), gm(inp), atol=1e-5, rtol=1e-5)
    return summary
