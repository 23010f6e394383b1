"""A float16 GEMM rounds as eager does, checked bit for bit on inputs whose float32 sums are exact
(so the order of the K-sum cannot matter): the anchor's result is rounded to float16 before its
epilogue, and a float32 bias of quant_linear is rounded to the input's dtype before it is added.
And a [M, 1] epilogue operand is read one value per row."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimfx.codegen.emit_gemm import emit_gemm
from slimfx.codegen.partition import partition

from graphs import QuantLinear, capture_module


def _run(model, x_export, x_run):
    gm = capture_module(model, x_export)
    (group,) = [g for g in partition(gm) if g.kind == "gemm"]
    kernel = emit_gemm(group)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x_run)
        want = model(x_run)
    (got,) = kernel.launch([interp.env[n] for n, _ in kernel.inputs])
    return got, want


class DenseMinusOne(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.w) - 1.0


def test_a_float16_gemm_result_is_rounded_before_its_epilogue():
    # x·w = 1 + 2^-11 + 2^-20 exactly in float32; float16 rounds it to 1 + 2^-10, so y - 1 is 2^-10.
    # Unrounded, y - 1 would be 2^-11 + 2^-20 (half as much).
    x = torch.zeros(3, 5, dtype=torch.float16)
    x[:, 0], x[:, 1] = 1.0, 2.0 ** -11 + 2.0 ** -20
    w = torch.zeros(7, 5, dtype=torch.float16)
    w[:, 0], w[:, 1] = 1.0, 1.0
    got, want = _run(DenseMinusOne(w), x[:2], x)
    assert want[0, 0].item() == 2.0 ** -10
    torch.testing.assert_close(got, want, atol=0, rtol=0)


class QuantMinus(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) - 1.0


def test_a_float32_bias_is_rounded_to_the_inputs_dtype_before_it_is_added():
    # Every weight 2^-11 (codes 129 - 128, scale 2^-11), x one-hot: the GEMM is 2^-11 exactly.
    # bias = 1 + 2^-12 in float32 is 1.0 in float16 (quant_linear casts it to x's dtype), so
    # y = round16(1 + 2^-11) = 1.0 (a tie, to even) and y - 1 = 0; the float32 bias would give
    # round16(1 + 2^-11 + 2^-12) = 1 + 2^-10.
    inner = QuantLinear(13, 9, 8, None, True, True, "none")
    assert inner.qweight.dtype == torch.uint8 and inner.zeros is None
    with torch.no_grad():
        inner.qweight.fill_(129)
        inner.scales.fill_(2.0 ** -11)
        inner.bias.fill_(1.0 + 2.0 ** -12)
    x = torch.zeros(3, 13, dtype=torch.float16)
    x[:, 4] = 1.0
    got, want = _run(QuantMinus(inner), x[:2], x)
    assert (want == 0).all()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


class RowScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(11, 9)

    def forward(self, x, s):
        return self.lin(x) * s  # s [M, 1]: one value per row


def test_a_row_operand_of_the_epilogue_is_read_per_row():
    torch.manual_seed(0)
    model = RowScaled().eval()
    n = torch.export.Dim("n")
    x, s = torch.randn(3, 11), torch.randn(3, 1)
    gm = torch.export.export(model, (x, s), dynamic_shapes=({0: n}, {0: n})).module()
    (group,) = [g for g in partition(gm) if g.kind == "gemm"]
    kernel = emit_gemm(group)
    assert "row" in kernel.roles
    x, s = torch.randn(7, 11), torch.randn(7, 1)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x, s)
        want = model(x, s)
    (got,) = kernel.launch([interp.env[node] for node, _ in kernel.inputs])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
