"""The shared rewrite helpers (passes/rewrite.py): new tensors follow the model's device."""
from __future__ import annotations

import torch

from slimfx.models import tiny
from slimfx.passes.capture import capture
from slimfx.passes.rewrite import register_tensors


def _graph_on_meta():
    """A captured tiny Llama whose tensors live on another device than the CPU ("meta" stands in
    for a GPU: the CPU machines have none, and the move is the same)."""
    lm = tiny("llama", layers=1)
    graph = capture(lm.model, lm.example_inputs)
    graph.module.to("meta")
    return graph


def _first_node(graph):
    return next(iter(graph.module.graph.nodes))


def test_a_new_parameter_goes_to_the_device_of_its_modules_weights():
    graph = _graph_on_meta()
    path = "model.layers.0.self_attn.q_proj"
    a = torch.nn.Parameter(torch.randn(4, 64))  # built on the CPU, as passes build them
    node = register_tensors(graph, path, {"lora_A": a}, _first_node(graph), parameters=True)["lora_A"]
    registered = graph.module.get_submodule(path).lora_A
    assert isinstance(registered, torch.nn.Parameter) and registered.requires_grad
    assert registered.device.type == "meta" and registered.shape == (4, 64)
    assert node.meta["val"].device.type == "meta"  # what later ops' fake values are computed from


def test_a_new_buffer_on_a_module_without_tensors_goes_to_the_models_device():
    graph = _graph_on_meta()
    path = "model.layers.0.self_attn"  # holds no tensor of its own, only its linears'
    node = register_tensors(graph, path, {"heal_T": torch.eye(3)}, _first_node(graph))["heal_T"]
    assert graph.module.get_submodule(path).heal_T.device.type == "meta"
    assert node.meta["val"].device.type == "meta"


def test_tensors_already_on_the_models_device_are_registered_as_they_are():
    lm = tiny("llama", layers=1)
    graph = capture(lm.model, lm.example_inputs)
    t = torch.randn(2, 2)
    register_tensors(graph, "model.norm", {"extra": t}, _first_node(graph))
    assert graph.module.get_submodule("model.norm").extra is t


class _OneLinearTwice(torch.nn.Module):
    """`a` applied to its own output: its second call's input is its first call's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.a(self.a(x)))


def test_a_linear_called_twice_in_a_chain_is_quantized_at_both_calls():
    """The second call's quant_linear read the first call's erased node (LintError)."""
    import slimfx
    from slimfx.runtime.formats import QuantFormat, dequantize, quantize_rtn  # pinned by test_formats.py
    model, x = _OneLinearTwice().eval(), torch.randn(3, 16)
    cm = slimfx.compile(model, "quantize a int8", example_inputs={"x": x}, backend="eager")
    wq = dequantize(quantize_rtn(model.a.weight.detach(), QuantFormat(8)))
    def lin(h): return h @ wq.T + model.a.bias
    with torch.no_grad():
        want = model.head(lin(lin(x)))
        assert torch.allclose(cm(x=x), want, atol=1e-5)


def test_a_linear_called_twice_in_a_chain_gets_its_adapter_on_each_calls_own_input():
    """The second call's adapter read the first call's base output, not what the first adapter
    made of it: 0.96 off once lora_B was trained."""
    import slimfx
    model, x = _OneLinearTwice().eval(), torch.randn(3, 16)
    cm = slimfx.compile(model, "adapt a lora rank=2 alpha=2", example_inputs={"x": x})
    with torch.no_grad():
        a_, b_ = cm.program.get_submodule("a").lora_A, cm.program.get_submodule("a").lora_B
        b_.copy_(torch.randn_like(b_))
        def lin(h): return model.a(h) + h @ a_.T @ b_.T
        assert torch.allclose(cm(x=x), model.head(lin(lin(x))), atol=1e-5)
