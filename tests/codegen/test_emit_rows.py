"""The row template (codegen/emit_rows.py) against eager: every pointwise and row group of random
graphs, generated, run through Triton (its interpreter without a GPU) and compared with the
values the graph computes; the RMSNorm group of a tiny Llama; refusals name the node."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import fx

import slimfx
from slimfx.codegen.emit_rows import Unsupported, emit_rows
from slimfx.codegen.partition import partition
from slimfx.models import tiny

from graphs import capture, programs


def _values(gm: fx.GraphModule, *inputs) -> dict:
    """Every node's value on `inputs`."""
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*inputs)
    return interp.env


def _check_group(group, env) -> None:
    kernel = emit_rows(group)
    outs = kernel.launch([env[n] for n, _ in kernel.inputs])
    for (node, _), got in zip(kernel.outputs, outs):
        torch.testing.assert_close(got, env[node].reshape(got.shape), atol=2e-5, rtol=2e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_every_pointwise_and_row_group_of_random_graphs_equals_eager(steps):
    gm, x = capture(steps)
    env = _values(gm, x)
    every = partition(gm)
    groups = [g for g in every if g.kind in ("pointwise", "rows")]
    for group in groups:
        _check_group(group, env)
    # Only linears make no such group, unless the ops after a linear went into its GEMM's epilogue
    # (linear then exp_tanh: one gemm group); every program of 2+ steps has another op.
    epilogues = [g for g in every if g.kind == "gemm" and len(g.nodes) > 1]
    assert groups or epilogues or all(op == "linear" for op, _ in steps)


def test_the_rmsnorm_group_of_a_tiny_llama():
    lm = tiny("llama", layers=1)
    cm = slimfx.compile(lm.model, "keep head", example_inputs=lm.example_inputs, backend="eager")
    env = _values(cm.program, *[lm.example_inputs[n] for n in cm.input_names])
    rms = [g for g in partition(cm.program) if g.kind == "rows"]
    assert len(rms) == 3  # two per block and the final norm
    for group in rms:
        _check_group(group, env)
    source = emit_rows(rms[0]).source
    assert "#   aten.mean.dim" in source and "tl.rsqrt" in source  # the header lists the ops
    assert "mean (aten.mean.dim)" in emit_rows(rms[0]).listing()  # the listing names the nodes
    assert len({emit_rows(g).source for g in rms}) == 1  # equal groups share one source


def test_unsupported_groups_name_the_node():
    gm, _ = capture([("relu", (0,))])
    group = next(g for g in partition(gm) if g.kind == "pointwise")
    group.nodes[0].target = torch.ops.aten.erfinv.default  # an op with no tl expression
    with pytest.raises(Unsupported, match="relu: no tl expression"):
        emit_rows(group)


def test_operands_that_broadcast_are_read_through_their_strides():
    # Rotary's shape: q [B, H, T, D] * cos [1, 1, T, D] + q * sin, with sin a transposed view.
    class Rotary(torch.nn.Module):
        def forward(self, q, cos, sin_t):
            return q * cos[None, None] + torch.relu(q) * sin_t.t()[None, None]

    q, cos, sin_t = torch.randn(2, 3, 5, 8), torch.randn(5, 8), torch.randn(8, 5)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ep = torch.export.export(Rotary(), (q, cos, sin_t), dynamic_shapes=({0: batch, 2: seq}, {0: seq}, {1: seq}))
    gm = ep.module()
    q2, cos2, sin2 = torch.randn(3, 3, 7, 8), torch.randn(7, 8), torch.randn(8, 7)
    env = _values(gm, q2, cos2, sin2)
    groups = [g for g in partition(gm) if g.kind == "pointwise"]
    roles = [role for g in groups for _, role in emit_rows(g).inputs]
    assert roles.count("bcast") == 2  # cos, and sin through its transpose
    for group in groups:
        _check_group(group, env)


def test_an_operand_of_last_size_1_that_broadcasts_is_one_value_per_row():
    """A per-sample temperature [B, 1, 1] against rows [B, S, D] was loaded as a [BLOCK] vector:
    the row value computed from it could not be stored ('Value argument cannot be block type if
    pointer argument is not a block'), at every call."""
    class Tempered(torch.nn.Module):
        def forward(self, h, t):
            m = h.amax(-1, keepdim=True) / t
            return h - m, m, (h * t).sum(-1)

    h, t = torch.randn(2, 3, 5), torch.rand(2, 1, 1) + 0.5
    batch = torch.export.Dim("batch")
    gm = torch.export.export(Tempered(), (h, t), dynamic_shapes=({0: batch}, {0: batch})).module()
    h2, t2 = torch.randn(3, 3, 5), torch.rand(3, 1, 1) + 0.5
    env = _values(gm, h2, t2)
    groups = [g for g in partition(gm) if g.kind in ("pointwise", "rows")]
    assert any(role == "bcast" for g in groups for _, role in emit_rows(g).inputs)
    for group in groups:
        _check_group(group, env)


def test_a_refusal_left_to_eager_ops_reads_as_a_sentence_and_counts_with_its_equals():
    """index.txt listed "3 × is torch.int64: …": the node's name was cut off and its noun with it,
    and a name of a node the group reads was kept, so equal refusals did not count together."""
    from slimfx.codegen.emit import emit_all

    class Ints(torch.nn.Module):
        def forward(self, x):
            a = (x.long() + 1) * 2
            return a.unsqueeze(0) - 1, (x.long() * 3).unsqueeze(0) + 4

    from graphs import capture_module

    gm = capture_module(Ints(), torch.ones(3, 4))
    groups = [g for g in partition(gm) if g.kind != "opaque"]
    reasons = [why for _, why in emit_all(groups).eager]
    assert reasons and all(why.startswith("a value is torch.int64: the row template reads") for why in reasons)
    assert len(set(reasons)) == 1
