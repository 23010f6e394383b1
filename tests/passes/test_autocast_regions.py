"""Regions where a model's own code turns autocast off (passes/autocast_regions.py): kept through
capture, so a compiled model under the caller's autocast computes as the model does — against the
model itself under the same autocast — saved and loaded too; outside autocast nothing changes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfx


class _RotaryLike(nn.Module):
    """transformers 5.17's rotary frequencies in small: a float32 product under
    `maybe_autocast(enabled=False)` (a null context unless autocast is on), cast to x's dtype."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("inv", torch.randn(1, 8, 1))

    def forward(self, x):
        from transformers.utils.generic import maybe_autocast

        pos = torch.arange(x.shape[1], dtype=torch.float32, device=x.device)[None, None, :].expand(x.shape[0], 1, -1)
        with maybe_autocast(x.device.type, enabled=False):
            cos = (self.inv.float().expand(x.shape[0], -1, -1) @ pos.float()).transpose(1, 2).cos()
        return self.proj(x) * cos.to(x.dtype)


@pytest.fixture(scope="module")
def rotary():
    pytest.importorskip("transformers.utils.generic").maybe_autocast  # noqa: B018 - 5.x has it
    torch.manual_seed(0)
    model = _RotaryLike().eval()
    x = torch.randn(2, 5, 8)
    return model, x, slimfx.compile(model, "", example_inputs={"x": x}, progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_region_that_turns_autocast_off_computes_as_the_model_does_under_autocast(rotary, dtype, tmp_path):
    """The region's matmul was a plain aten.matmul: in half under the caller's autocast, and the
    graph's dtype checks refused every call ("Tensor dtype mismatch")."""
    model, x, cm = rotary
    targets = [n.target for n in cm.program.graph.nodes if n.op == "call_function"]
    assert torch.ops.slimfx.matmul_without_autocast.default in targets
    assert not any("wrap_with_autocast" in str(t) for t in targets)
    cm.save(tmp_path / "a")
    loaded = slimfx.load(tmp_path / "a")
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        want = model(x)
        for compiled in (cm, loaded):
            got = compiled(x)
            assert got.dtype == want.dtype and torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))


def test_capture_puts_maybe_autocast_back(rotary):
    from transformers.utils import generic

    from slimfx.passes import autocast_regions

    original = generic.maybe_autocast
    with autocast_regions.recording():
        assert generic.maybe_autocast is not original
    assert generic.maybe_autocast is original
    assert not torch.is_autocast_enabled("cpu")
    with original("cpu", enabled=False) as region:  # still the null context outside autocast
        assert not isinstance(region, torch.autocast)


def test_a_region_that_turns_autocast_on_is_left_as_it_is():
    """Only regions that turn it off are inlined: one that turns it on changes the ops' dtypes
    inside the graph, which is what export's region records."""
    from slimfx.passes import autocast_regions

    class On(nn.Module):
        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return x @ x.transpose(-1, -2)

    program = torch.export.export(On(), (torch.randn(3, 4),), strict=False)
    assert autocast_regions.inline(program.graph_module) == 0
    assert any("wrap_with_autocast" in str(n.target) for n in program.graph_module.graph.nodes)
