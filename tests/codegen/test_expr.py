"""The tl expressions and row-reduction lines of codegen/expr.py against eager on values the
defaults of tl get wrong: a NaN through relu (tl.maximum dropped it: 0) and amax (tl.max
dropped it: the row's largest finite value), and a reduction asked for in another dtype
(`x.sum(-1, dtype=torch.float16)`: the kernel reduced the unrounded float32 values)."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from slimfx.codegen.lower import lower_graph


def _lowered(model: nn.Module, x: torch.Tensor):
    gm = torch.export.export(model.eval(), (x,)).module()
    new, summary = lower_graph(gm.graph)
    assert summary.eager == (), summary.eager  # every op ran in a generated kernel
    return fx.GraphModule(gm, new), gm


class Relu(nn.Module):
    def forward(self, x):
        return torch.relu(x * 2.0)


class Amax(nn.Module):
    def forward(self, x):
        return (x * 2.0).amax(-1, keepdim=True)


class LinearRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.a(x))


@pytest.mark.parametrize("model", [Relu(), Amax(), LinearRelu()], ids=["relu", "amax", "gemm-relu"])
def test_a_nan_comes_through_as_torch_gives_it(model):
    x = torch.tensor([[1.0, float("nan"), -1.0, 3.0], [1.0, 2.0, -1.0, 3.0]])
    lowered, gm = _lowered(model, x)
    with torch.no_grad():
        got, want = lowered(x), gm(x)
    assert want.isnan().any()  # the case at hand: a NaN in the eager result
    torch.testing.assert_close(got, want, equal_nan=True, atol=1e-6, rtol=1e-6)


class SumIn(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return (x * 1.5).sum(-1, dtype=self.dtype) + 1


class SoftmaxIn(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return torch.softmax(x * 1.5, -1, dtype=self.dtype) + 1


@pytest.mark.parametrize("op", [SumIn, SoftmaxIn])
def test_a_reduction_asked_for_in_a_half_dtype_converts_its_input_first(op):
    """float16 only: Triton's interpreter truncates to bfloat16 where torch rounds (test_dtypes.py),
    so a bfloat16 conversion of 64 inputs cannot be compared exactly here."""
    dtype = torch.float16
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    lowered, gm = _lowered(op(dtype), x)
    with torch.no_grad():
        got, want = lowered(x), gm(x)
        unrounded = op(torch.float32)(x).to(dtype)
    assert got.dtype == want.dtype == dtype
    assert not torch.equal(unrounded, want)  # the dtype matters on these values
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=0)
