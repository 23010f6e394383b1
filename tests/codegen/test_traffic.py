"""The traffic model (codegen/traffic.py) on a graph whose bytes are counted by hand."""
from __future__ import annotations

import copy

import torch

import slimfx
from slimfx.codegen.traffic import measure
from slimfx.models import tiny

from graphs import D, capture


def test_bytes_and_kernels_of_a_linear_with_its_epilogue():
    # x [3, 8] → linear(W [8, 8], b [8]) → relu → + x: three kernels unfused, one fused.
    gm, x = capture([("linear", (0,)), ("relu", (1,)), ("add", (2, 0))])
    unfused, fused, groups = measure(gm, [x])
    act = 3 * D * 4  # one [3, 8] float32 activation
    weights = (D * D + D) * 4
    # linear reads x, writes y; relu reads y, writes r; add reads r and x, writes the output.
    assert (unfused.kernels, unfused.activation_bytes, unfused.weight_bytes) == (3, 7 * act, weights)
    # fused: reads x once (the linear and the add share it), writes the output; the outputs
    # returned are the add and the relu (the program returns its last two values), so r is written too.
    assert (fused.kernels, fused.activation_bytes, fused.weight_bytes) == (1, 3 * act, weights)


def test_tiny_llama_int4_moves_fewer_bytes_in_fewer_kernels():
    lm = tiny("llama", layers=2)
    cm = slimfx.compile(lm.model, "quantize blocks.*.** : Linear int4 group=32", example_inputs=lm.example_inputs,
                        backend="eager")
    unfused, fused, _ = measure(cm.program, [lm.example_inputs[n] for n in cm.input_names])
    assert fused.weight_bytes == unfused.weight_bytes  # every weight is read once either way
    assert fused.kernels < 0.6 * unfused.kernels
    assert fused.activation_bytes < 0.7 * unfused.activation_bytes


def test_exports_metadata_checks_add_no_traffic():
    """As the lowered graph runs (codegen/lower.py drops the checks): a check that read a value
    inside a group made it a group output, counted as written — a Llama's RMSNorm group wrote
    the float32 value its .to() check read besides its output."""
    check = torch.ops.aten._assert_tensor_metadata.default
    lm = tiny("llama", layers=2)
    cm = slimfx.compile(lm.model, "", example_inputs=lm.example_inputs, backend="eager")
    inputs = [lm.example_inputs[n] for n in cm.input_names]
    unchecked = copy.deepcopy(cm.program)
    checks = [n for n in unchecked.graph.nodes if n.target is check]
    assert checks  # the graph has them
    for n in checks:
        unchecked.graph.erase_node(n)
    unchecked.recompile()
    assert measure(cm.program, inputs)[1] == measure(unchecked, inputs)[1]
