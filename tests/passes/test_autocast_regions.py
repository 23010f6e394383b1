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


class _Nested(nn.Module):
    """The rotary product inside the model's own `torch.autocast(enabled=False)` with a product of
    its own: a region in a region. The inner region's submodule was copied into the graph under
    the outer body's name (capture failed: "references nonexistent attribute")."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("inv", torch.randn(1, 8, 1))

    def forward(self, x):
        from transformers.utils.generic import maybe_autocast

        pos = torch.arange(x.shape[1], dtype=torch.float32)[None, None, :].expand(x.shape[0], 1, -1)
        with torch.autocast("cpu", enabled=False):
            with maybe_autocast("cpu", enabled=False):
                freqs = (self.inv.expand(x.shape[0], -1, -1) @ pos).transpose(1, 2)
            mixed = freqs.cos() @ freqs.sin().transpose(1, 2) @ freqs
        return self.proj(x) * mixed.to(x.dtype)


class _LinearInRegion(nn.Module):
    """A linear inside the model's own autocast-off region: autocast would change it, and
    slimfx has no op that keeps it from doing so."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            y = self.proj(x.float())
        return y.softmax(-1)


def _compiled(model_class, seed):
    pytest.importorskip("transformers.utils.generic").maybe_autocast  # noqa: B018
    torch.manual_seed(seed)
    model, x = model_class().eval(), torch.randn(2, 5, 8)
    return model, x, slimfx.compile(model, "", example_inputs={"x": x}, progress=False)


def _calls(cm) -> list:
    return [n.target for n in cm.program.graph.nodes if n.op == "call_function"]


def test_regions_in_regions_are_inlined_whole(tmp_path):
    model, x, cm = _compiled(_Nested, 1)
    assert _calls(cm).count(torch.ops.slimfx.matmul_without_autocast.default) == 3
    assert not any("wrap_with_autocast" in str(t) for t in _calls(cm))
    cm.save(tmp_path / "n")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        for compiled in (cm, slimfx.load(tmp_path / "n")):
            assert torch.equal(compiled(x), want)


def test_a_region_holding_another_op_autocast_changes_is_kept_as_a_region(tmp_path):
    """Inlined, its linear ran in bfloat16 under the caller's autocast where the model's ran in
    float32: a silent difference. Kept, the graph computes as the model does; saving names it."""
    from slimfx.runtime.artifact_errors import ArtifactError

    model, x, cm = _compiled(_LinearInRegion, 2)
    assert any("wrap_with_autocast" in str(t) for t in _calls(cm))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cm(x), model(x))
    with pytest.raises(ArtifactError, match="wrap_with_autocast"):
        cm.save(tmp_path / "l")


def test_captures_that_overlap_put_maybe_autocast_back():
    """The second capture took the first one's patch for the original and kept it."""
    from transformers.utils import generic

    from slimfx.passes import autocast_regions

    original = generic.maybe_autocast
    first, second = autocast_regions.recording(), autocast_regions.recording()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert generic.maybe_autocast is not original  # the second still records
    second.__exit__(None, None, None)
    assert generic.maybe_autocast is original
