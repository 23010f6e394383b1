"""What must miss capture's cache, found by a mutation audit of passes/capture_cache.py: each test
fails with one part of the key (or of the kept list's upkeep) taken out, where the other tests
passed. And two stale traces the original served: an edit inside a container nested deeper than
the key walks, and a hook registered for every module after the first trace."""
from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

from slimfx.passes import capture_cache
from slimfx.passes.capture import capture
from slimfx.passes.capture_cache import cache_info, clear_cache, share_traces
from test_capture_cache import _matches_the_model


@pytest.fixture(autouse=True)
def sharing():
    before = share_traces(True)
    yield
    share_traces(before)


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x, double: bool = False):
        y = self.lin(x)
        return y * 2 if double else y


def test_another_keyword_constant_is_traced_again():
    model, x = Flagged().eval(), torch.randn(2, 4)
    clear_cache()
    capture(model, {"x": x, "double": True})
    graph = capture(model, {"x": x, "double": False})
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))


def test_other_dynamic_dims_are_traced_again():
    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    clear_cache()
    capture(model, (x,), dynamic={"input": {}})  # static: batch 2 only
    graph = capture(model, (x,))
    assert graph.inputs[0].dims == {0: "batch"}
    y = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(graph(y), model(y))


def test_a_new_parameter_over_the_old_storage_is_traced_again():
    """`nn.Parameter(w.data.t())`: a new tensor at the old one's address, both at version 0."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 4, bias=False)).eval(), torch.randn(2, 4)
    clear_cache()
    capture(model, (x,))
    old = model[0].weight
    model[0].weight = nn.Parameter(old.data.t())  # the same address
    with torch.no_grad():
        while model[0].weight._version < old._version:  # and the same version (capture bumped the old one's)
            model[0].weight.add_(0.0)
    assert _matches_the_model(model, x)


class Sized(nn.Module):
    """Reads a parameter's size that no attribute records: export bakes it into the trace."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return (x.sum(-1, keepdim=True) * self.w + torch.arange(self.w.shape[0]),)


def test_a_parameter_resized_through_data_is_traced_again():
    """`.data =` (as structured pruning does) keeps the tensor object and its version."""
    model, x = Sized(4).eval(), torch.randn(2, 4)
    clear_cache()
    capture(model, (x,))
    model.w.data = torch.ones(3)
    assert _matches_the_model(model, x)


def test_a_model_with_other_parameter_shapes_is_traced_again():
    x = torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(Sized(4).eval(), x)
    assert _matches_the_model(Sized(3).eval(), x)
    assert cache_info()["reused"] == 0


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def act(self, h):
        return torch.relu(h)

    def forward(self, x):
        return (self.act(self.lin(x)),)


class TanhGate(Gate):  # Gate's forward, another method under it
    def act(self, h):
        return torch.tanh(h)


def test_a_subclass_with_the_same_forward_is_traced_again():
    x = torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(Gate().eval(), x)
    assert _matches_the_model(TanhGate().eval(), x)
    assert cache_info()["reused"] == 0


def test_a_forward_pre_hook_misses_the_cache():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    clear_cache()
    capture(model, (x,))
    model[0].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    graph = capture(model, (x,))
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))


class Scale(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, h):
        return h * self.s


class Kernels(nn.Module):
    """A tensorless module kept unregistered, in a list (as transformers keeps `_kernel_funcs`)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self._kernels = [Scale(2.0)]

    def forward(self, x):
        return (self._kernels[0](self.lin(x)),)


def test_an_edit_inside_an_unregistered_module_misses_the_cache():
    model, x = Kernels().eval(), torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(model, x)
    model._kernels[0].s = 3.0
    assert _matches_the_model(model, x)


def _double(h):
    return h * 2


def _triple(h):
    return h * 3


class Applies(nn.Module):
    def __init__(self, fn):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.fn = nn.Linear(4, 4), fn

    def forward(self, x):
        return (self.fn(self.lin(x)),)


def test_a_function_attribute_swapped_for_another_misses_the_cache():
    x = torch.randn(2, 4)
    clear_cache()
    model = Applies(_double).eval()
    assert _matches_the_model(model, x)
    model.fn = _triple
    assert _matches_the_model(model, x)
    assert _matches_the_model(Applies(_double).eval(), x)
    assert cache_info()["reused"] == 1  # a module-level function is any model's: shared


def test_a_replaced_weight_is_not_kept_by_the_models_older_trace():
    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    clear_cache()
    capture(model, (x,))
    old = weakref.ref(model[0].weight)
    model[0].weight = nn.Parameter(torch.zeros(4, 4))
    capture(model, (x,))
    gc.collect()
    assert old() is None


def test_turning_sharing_off_forgets_the_traces_kept_across_models():
    clear_cache()
    capture(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(2, 4),))
    assert cache_info()["shared"] == 1
    share_traces(False)
    assert cache_info()["shared"] == 0


def test_the_trace_reused_last_is_evicted_last(monkeypatch):
    builds = [lambda: nn.Sequential(nn.Linear(4, 4)), lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
              lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh())]
    x = torch.randn(2, 4)
    clear_cache()
    for build in builds:
        capture(build().eval(), (x,))
    nodes = sum(len(e.program.graph.nodes) for e in capture_cache._SHARED.values())
    clear_cache()
    monkeypatch.setattr(capture_cache, "SHARED_NODES", nodes - 1)  # room for two of the three
    a, b, c = builds
    for build in (a, b, a, c, a):  # a reused, so b is the least recently used when c comes
        capture(build().eval(), (x,))
    assert cache_info()["reused"] == 2 and cache_info()["misses"] == 3


@dataclasses.dataclass(slots=True)
class SlotCfg:
    scale: float = 1.0


class SlotConfigured(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config, self.lin = SlotCfg(), nn.Linear(4, 4)

    def forward(self, x):
        return (self.lin(x) * self.config.scale,)


def test_an_edited_slots_dataclass_config_is_traced_again():
    model, x = SlotConfigured().eval(), torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(model, x)
    model.config.scale = 3.0
    assert _matches_the_model(model, x)


class Flat(nn.Module):
    def __init__(self, transposed: bool):
        super().__init__()
        torch.manual_seed(0)
        w = torch.randn(4, 4)
        self.w = nn.Parameter(w.t() if transposed else w)

    def forward(self, x):
        return (x * self.w.reshape(-1)[:4],)


def test_a_model_whose_parameter_has_other_strides_is_traced_again():
    x = torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(Flat(False).eval(), x)
    assert _matches_the_model(Flat(True).eval(), x)


class Attr(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.scale = torch.tensor(2.0)

    def forward(self, x):
        return (self.lin(x) * self.scale,)


def test_a_tensor_attribute_edited_in_place_misses_the_cache():
    model, x = Attr().eval(), torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(model, x)
    model.scale.mul_(3.0)
    assert _matches_the_model(model, x)


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.opts = {"a": {"b": {"c": [2.0]}}}

    def forward(self, x):
        return (self.lin(x) * self.opts["a"]["b"]["c"][0],)


def test_an_edit_inside_a_deeply_nested_container_misses_the_cache():
    """Past the depth the key walks, the list was keyed by identity: the edit was not seen."""
    model, x = Deep().eval(), torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(model, x)
    model.opts["a"]["b"]["c"][0] = 3.0
    assert _matches_the_model(model, x)
    assert cache_info()["hits"] == 0 and cache_info()["shared"] == 0  # never equal: never kept across models


def test_a_hook_registered_for_every_module_misses_the_cache():
    from torch.nn.modules.module import register_module_forward_hook

    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(model, x)
    handle = register_module_forward_hook(lambda mod, args, out: out * 2 if isinstance(mod, nn.Linear) else None)
    try:
        assert _matches_the_model(model, x)
        assert _matches_the_model(nn.Sequential(nn.Linear(4, 4)).eval(), x)  # a model built alike, shared
    finally:
        handle.remove()
    assert _matches_the_model(model, x)


class NestedConfig:
    """A config with a sub-config, as a multimodal model's (text_config.rope_parameters lists)."""

    def __init__(self):
        self.text_config = {"rope": {"section": [2.0, 3.0]}}

    def to_dict(self):
        return {"text_config": self.text_config}


class Configured(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.config = nn.Linear(4, 4), NestedConfig()

    def forward(self, x):
        return (self.lin(x) * self.config.text_config["rope"]["section"][0],)


def test_a_config_is_keyed_by_all_its_values_and_hits_while_unchanged():
    """Walked as a plain object, the sub-config's list lay past the depth walked: never equal, so
    such a model was traced on every capture (and check_policy inside @given compiled it again)."""
    model, x = Configured().eval(), torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(model, x) and _matches_the_model(model, x)
    assert cache_info()["hits"] == 1
    model.config.text_config["rope"]["section"][0] = 5.0
    assert _matches_the_model(model, x)
    assert cache_info()["misses"] == 2
