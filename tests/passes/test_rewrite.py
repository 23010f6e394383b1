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
