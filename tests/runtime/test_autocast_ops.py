"""`slimfx::matmul_without_autocast` against torch.matmul outside autocast: values, dtype, the
gradients of both inputs (broadcast batch dims summed), and only the named device's autocast off."""
from __future__ import annotations

import torch

from slimfx.runtime import ops  # noqa: F401 - registers every slimfx:: op

op = torch.ops.slimfx.matmul_without_autocast


def test_under_autocast_it_computes_in_its_inputs_dtype():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(4, 5, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, halved, elsewhere = op(a, b, torch.device("cpu")), torch.matmul(a, b), op(a, b, torch.device("cuda"))
    assert halved.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert torch.equal(got, torch.matmul(a, b))
    # a region that turns off CUDA's autocast leaves the CPU's on, as in the model
    assert elsewhere.dtype == torch.bfloat16 and torch.equal(elsewhere, halved)


def test_its_gradients_are_matmuls():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    b = torch.randn(4, 5, generator=g, requires_grad=True)
    up = torch.randn(2, 3, 5, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (op(a, b, torch.device("cpu")) * up).sum().backward()
    got = a.grad.clone(), b.grad.clone()
    assert torch.allclose(got[0], up @ b.detach().T) and torch.allclose(got[1], (a.detach().transpose(1, 2) @ up).sum(0))
    c = torch.randn(4, 5, generator=g)  # only one input wants a gradient
    a.grad = None
    op(a, c, torch.device("cpu")).sum().backward()
    assert torch.allclose(a.grad, torch.ones(2, 3, 5) @ c.T)
