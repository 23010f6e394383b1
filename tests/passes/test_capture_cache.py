"""The trace of one model re-bound to another built like it: what is shared, and what never is."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

from slimfx.models import tiny
from slimfx.passes import capture_cache
from slimfx.passes.capture import capture
from slimfx.passes.capture_cache import cache_info, clear_cache, share_traces


@pytest.fixture(autouse=True)
def sharing():
    before = share_traces(True)
    yield
    share_traces(before)


def _outputs(graph, inputs):
    with torch.no_grad():
        return graph(**inputs)


# gpt2 ties lm_head to the embedding; gemma2 keeps a functools.partial per MLP; bert is an encoder
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "bert"])
def test_a_model_built_like_one_traced_before_gets_that_trace_over_its_own_weights(arch):
    clear_cache()
    first, second = tiny(arch, seed=1), tiny(arch, seed=2)
    capture(first.model, first.example_inputs)
    graph = capture(second.model, second.example_inputs)
    assert cache_info()["misses"] == 1 and cache_info()["reused"] == 1
    own = dict(second.model.named_parameters())
    for name, value in graph.module.named_parameters():
        assert torch.equal(value, own[name]), name
    clear_cache()
    traced = capture(second.model, second.example_inputs)  # what a trace of its own gives
    assert cache_info()["misses"] == 1
    want, got = _outputs(traced, second.example_inputs), _outputs(graph, second.example_inputs)
    for key in want.keys():
        assert torch.equal(got[key], want[key]), key
    if arch == "gpt2":
        assert graph.param("lm_head.weight") is graph.param("transformer.wte.weight")


def test_the_kept_trace_holds_no_tensor_of_its_model_and_does_not_keep_it_alive():
    clear_cache()
    lm = tiny("llama", seed=3)
    capture(lm.model, lm.example_inputs)
    (kept,) = capture_cache._SHARED.values()
    assert all(t.is_meta for t in kept.program.state_dict.values())
    ref = weakref.ref(lm.model)
    del lm
    gc.collect()
    assert ref() is None


def test_a_lent_reused_trace_reads_the_new_models_storage():
    clear_cache()
    first, second = tiny("llama", seed=4), tiny("llama", seed=5)
    capture(first.model, first.example_inputs)
    graph = capture(second.model, second.example_inputs, lend=True)
    assert cache_info()["reused"] == 1
    name = "model.layers.0.mlp.up_proj.weight"
    assert graph.param(name).data_ptr() == second.model.get_parameter(name).data_ptr()


class Scaled(nn.Module):
    """A plain tensor attribute (not a buffer), whose value export bakes into the trace; or a
    hook of its own, a closure over the model."""

    def __init__(self, scale: float, hook: bool = False):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = torch.tensor(scale)
        if hook:
            self.lin.register_forward_hook(lambda mod, args, out: out * self.factor)
            self.factor = scale

    def forward(self, x):
        return self.lin(x) * self.scale


@pytest.mark.parametrize("hook", [False, True], ids=["tensor attribute", "per-object hook"])
def test_a_model_with_an_object_of_its_own_is_traced_and_not_kept_alive(hook):
    """Such a key matches no other model: its trace is not kept across models. And the model's own
    key held a hook that closes over the model, which kept the model alive for good."""
    clear_cache()
    x = torch.randn(2, 4)
    refs = []
    for scale in (1.0, 3.0):
        model = Scaled(scale, hook=hook).eval()
        graph = capture(model, (x,))
        with torch.no_grad():
            assert torch.equal(graph(x), model(x))
        refs.append(weakref.ref(model))
        del model, graph
    assert cache_info()["misses"] == 2 and cache_info()["reused"] == 0
    assert cache_info()["shared"] == 0  # not kept: it could only ever match the model itself
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_other_tying_dtype_or_shape_is_traced_again():
    clear_cache()
    tied = tiny("gpt2", seed=1)
    capture(tied.model, tied.example_inputs)
    untied = tiny("gpt2", seed=1)
    untied.model.lm_head.weight = nn.Parameter(untied.model.lm_head.weight.detach().clone())
    graph = capture(untied.model, untied.example_inputs)
    assert graph.param("lm_head.weight") is not graph.param("transformer.wte.weight")
    double = tiny("gpt2", seed=1)
    double.model.double()
    capture(double.model, double.example_inputs)
    deeper = tiny("gpt2", layers=3, seed=1)
    capture(deeper.model, deeper.example_inputs)
    assert cache_info()["misses"] == 4 and cache_info()["reused"] == 0


def test_traces_kept_across_models_are_bounded_by_their_nodes(monkeypatch):
    clear_cache()
    monkeypatch.setattr(capture_cache, "SHARED_NODES", 1)
    for layers in (1, 2):
        lm = tiny("llama", layers=layers)
        capture(lm.model, lm.example_inputs)
    assert cache_info()["shared"] == 1  # the latest one, even over the bound
    again = tiny("llama", layers=1, seed=7)
    capture(again.model, again.example_inputs)
    assert cache_info()["misses"] == 3


def test_sharing_is_off_unless_asked_for():
    """A user's process traces every model (a patched module-level function is then seen by the
    next fresh model); the test suite turns sharing on in conftest.py."""
    code = ("from slimfx.passes import capture_cache as c; from slimfx.models import tiny; "
            "from slimfx.passes.capture import capture\n"
            "for seed in (1, 2):\n    lm = tiny('llama', layers=1, seed=seed); capture(lm.model, lm.example_inputs)\n"
            "print(c.cache_info())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'reused': 0, 'misses': 2" in out, out
    share_traces(False)
    clear_cache()
    for seed in (1, 2):
        lm = tiny("llama", layers=1, seed=seed)
        capture(lm.model, lm.example_inputs)
    assert cache_info()["misses"] == 2 and cache_info()["shared"] == 0


def test_a_weight_edit_reuses_the_models_trace_over_the_edited_weights():
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval(), torch.randn(2, 8)
    clear_cache()
    first = capture(model, (x,))
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # bumps _version: not this model's cached trace any more
    second = capture(model, (x,))
    model[2].weight = nn.Parameter(torch.zeros(8, 16))  # a new tensor object
    third = capture(model, (x,))
    assert cache_info()["misses"] == 1 and cache_info()["reused"] == 2
    with torch.no_grad():
        assert not torch.equal(first(x), model(x))
        assert torch.equal(third(x), model(x))
    assert torch.equal(second.param("0.weight"), model[0].weight)
    assert torch.equal(third.param("2.weight"), torch.zeros(8, 16))


class Private(nn.Module):
    """What a forward reads from private attributes, a class value, or a number's type."""
    shift = 0.0

    def __init__(self, scale=1.0, value=1.0, tensor: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self._scale = torch.full((4,), float(scale)) if tensor else scale
        self.value = value

    def forward(self, x):
        return self.lin(x) * self._scale + self.shift, torch.full((x.shape[0],), self.value)


def _matches_the_model(model, x):
    graph = capture(model, (x,))
    with torch.no_grad():
        got, want = graph(x), model(x)
    return all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("first, second", [
    (lambda: Private(1.0), lambda: Private(3.0)),                            # a private number
    (lambda: Private(1.0, tensor=True), lambda: Private(3.0, tensor=True)),  # a private tensor
    (lambda: Private(value=1), lambda: Private(value=1.0)),                  # 1 == 1.0, other dtype
    (lambda: Private(value=True), lambda: Private(value=1)),
], ids=["private value", "private tensor", "int then float", "bool then int"])
def test_what_the_forward_reads_from_the_model_tells_models_apart(first, second):
    x = torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(first().eval(), x)
    assert _matches_the_model(second().eval(), x)
    assert cache_info()["reused"] == 0


class Shifted(Private):
    """Its class value is its base's."""


@pytest.mark.parametrize("cls", [Private, Shifted], ids=["its class", "a base class"])
def test_a_class_value_changed_between_two_models_is_traced_again(monkeypatch, cls):
    x = torch.randn(2, 4)
    clear_cache()
    assert _matches_the_model(cls(1.0).eval(), x)
    monkeypatch.setattr(Private, "shift", 5.0)
    assert _matches_the_model(cls(1.0).eval(), x)
    assert cache_info()["reused"] == 0


def test_neither_a_parametrized_model_nor_the_example_inputs_are_kept_alive():
    """parametrize makes a class per module whose property closes over the module; a kept trace
    (its key, its node metadata) held that class. And a kept program held the inputs it was made on."""
    clear_cache()
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    model, x = nn.Sequential(lin).eval(), torch.randn(2, 4)
    weight = weakref.ref(lin.parametrizations.weight.original1)
    inputs = weakref.ref(x)
    capture(model, (x,))
    assert cache_info()["shared"] == 0
    lm = tiny("llama", layers=1, seed=9)
    ids = weakref.ref(lm.example_inputs["input_ids"])
    capture(lm.model, lm.example_inputs)
    assert cache_info()["shared"] == 1
    del lin, model, x, lm
    gc.collect()
    assert weight() is None and inputs() is None and ids() is None
