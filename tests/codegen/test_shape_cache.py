"""Output shapes are looked up per binding of *every* symbolic size (kernel.py `Shapes`): calls
with the same batch and another sequence length must not reuse the first call's shapes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimfx.codegen.lower import lower_graph


class NormThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 7)

    def forward(self, x):  # x [B, S, 12]: a row kernel (layer norm) and a GEMM with its epilogue
        return F.silu(self.lin(F.layer_norm(x, (12,)) * 2.0))


def test_same_batch_other_sequence_lengths():
    torch.manual_seed(0)
    model = NormThenLinear().eval()
    b, s = torch.export.Dim("b"), torch.export.Dim("s")
    gm = torch.export.export(model, (torch.randn(2, 5, 12),), dynamic_shapes=({0: b, 1: s},)).module()
    new, summary = lower_graph(gm.graph)
    assert dict(summary.by_template) == {"gemm": 1, "rows": 1}
    lowered = fx.GraphModule(gm, new)
    with torch.no_grad():
        for shape in ((2, 5), (2, 9), (2, 3), (4, 9), (4, 5)):
            x = torch.randn(*shape, 12)
            got, want = lowered(x), model(x)
            assert got.shape == want.shape, shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
