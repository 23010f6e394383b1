"""A rewritten graph survives save/load: a linear replaced by slimfx::quant_linear over packed
uint8 buffers (the route DESIGN.md describes) comes back bit-identical, and the replaced
fp32 weight is neither in the module nor in the artifact."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import slimfx
from runtime_tiny import assert_identical, compiled, other_inputs, rehash
from slimfx.passes.capture import capture
from slimfx.runtime.artifact import ArtifactError, load
from slimfx.runtime.compiled import CompiledModel
from slimfx.runtime.formats import QuantFormat, quantize_rtn
from slimfx.runtime.ops import quant_linear_args
from slimfx.runtime.report import Report

TARGET = "model.layers.0.mlp.down_proj"


def _quantize_one_linear(graph, path: str) -> None:
    """Swap aten.linear(x, W) of module `path` for slimfx::quant_linear on int4 buffers."""
    gm = graph.module
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default
                and n.args[1].target == f"{path}.weight")
    owner = gm.get_submodule(path)
    qw = quantize_rtn(owner.weight.detach(), QuantFormat(4, 32, sym=True))
    del owner._parameters["weight"]  # replaced params leave the module, or they are saved too
    owner.register_buffer("qweight", qw.qweight)
    owner.register_buffer("scales", qw.scales)
    weight = node.args[1]
    with gm.graph.inserting_before(node):
        q = gm.graph.get_attr(f"{path}.qweight")
        s = gm.graph.get_attr(f"{path}.scales")
        call = gm.graph.call_function(torch.ops.slimfx.quant_linear.default,
                                      (node.args[0], q, s, None, None, *quant_linear_args(qw)))
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    gm.graph.erase_node(weight)
    gm.recompile()
    graph.reindex()


def test_quant_linear_round_trip(tmp_path):
    case = compiled("llama")
    graph = capture(case.loaded.model, case.loaded.example_inputs)  # a private copy
    _quantize_one_linear(graph, TARGET)
    cm = CompiledModel(graph, report=Report("int4", graph.model_class))
    assert cm.weight_bytes() < case.cm.weight_bytes()

    cm.save(tmp_path / "q")
    stored = load_file(tmp_path / "q" / "weights.safetensors")
    assert f"{TARGET}.weight" not in stored and stored[f"{TARGET}.qweight"].dtype == torch.uint8
    back = load(tmp_path / "q")
    assert f"{TARGET}.weight" not in dict(back.program.named_parameters())
    for x in (case.loaded.example_inputs, other_inputs(case.loaded)):
        assert_identical(back(**x), cm(**x), "int4 llama")
    assert back.weight_bytes() == cm.weight_bytes()


def test_a_quant_linear_whose_arguments_the_reference_refuses_is_refused_by_the_kernels_too(tmp_path):
    """An artifact whose group was edited (32 → 64) failed under eager and ran under `auto`, 0.09
    off: the CPU kernels' conversion did not check what the reference op checks."""
    model = nn.Sequential(nn.Linear(64, 32))
    slimfx.compile(model, "quantize ** : Linear int4 group=32", example_inputs={"input": torch.randn(2, 64)},
                   ).save(tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "program.json").read_text())
    node = next(n for n in doc["nodes"] if n["op"] == "call_function" and "quant_linear" in n["target"])
    assert node["args"][6] == 32
    node["args"][6] = 64
    (tmp_path / "a" / "program.json").write_text(json.dumps(doc))
    rehash(tmp_path / "a")
    for backend in ("auto", "eager"):
        with pytest.raises((ArtifactError, ValueError), match=r"scales is \(32, 2\), expected \(32, 1\)"):
            slimfx.load(tmp_path / "a", backend=backend)(torch.randn(2, 64))
