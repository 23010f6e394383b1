"""runtime/forward_parts.py: a large graph's forward compiled in parts computes exactly what the
whole-graph forward computes, takes the same arguments, and frees each value after its last use."""
from __future__ import annotations

import copy
import inspect
import pickle
import weakref

import pytest
import torch
from torch import fx, nn

from slimfx import models
from slimfx.passes.capture import capture
from slimfx.runtime import forward_parts
from slimfx.runtime.forward_parts import recompile


def _parts_of(gm: fx.GraphModule) -> int:
    """How many parts `gm.forward` runs (0: the whole-graph forward torch.fx generated)."""
    doc = type(gm).forward.__doc__ or ""
    return int(doc.split(" in ")[1].split()[0]) if "compiled in" in doc else 0


@pytest.fixture(scope="module")
def llama_graph():
    lm = models.tiny("llama")
    return lm, capture(lm.model, lm.example_inputs)


@pytest.mark.parametrize("part_nodes", [7, 40])
def test_parts_compute_the_whole_forward_bit_for_bit(llama_graph, monkeypatch, part_nodes):
    lm, graph = llama_graph
    gm = graph.module
    gm.recompile()
    x = lm.example_inputs
    whole = gm(x["input_ids"], x["attention_mask"])
    source = gm.code
    monkeypatch.setattr(forward_parts, "PART_NODES", part_nodes)
    recompile(gm)
    body = sum(n.op not in ("placeholder", "get_attr", "output") for n in gm.graph.nodes)
    assert _parts_of(gm) == -(-body // part_nodes) > 2
    parted = gm(x["input_ids"], x["attention_mask"])
    assert type(parted) is type(whole)  # the output pytree is rebuilt as the whole forward did
    for a, b in zip(whole, parted):
        assert torch.equal(a, b)
    assert str(inspect.signature(gm.forward)) == "(input_ids, attention_mask)"
    assert gm.code == source  # what gm.code shows is still the whole graph's program
    gm.recompile()
    assert _parts_of(gm) == 0


def test_copies_of_a_parted_module_compute_the_same(llama_graph, monkeypatch):
    lm, graph = llama_graph
    gm = graph.module
    monkeypatch.setattr(forward_parts, "PART_NODES", 16)
    recompile(gm)
    x = tuple(lm.example_inputs.values())
    expected = gm(*x)[0]
    assert torch.equal(copy.deepcopy(gm)(*x)[0], expected)
    gm.recompile()
    # (an exported module cannot be pickled at all; a plain GraphModule can, parted or not)
    probe = _probe_graph()
    monkeypatch.setattr(forward_parts, "PART_NODES", 2)
    recompile(probe)
    assert torch.equal(pickle.loads(pickle.dumps(probe))(torch.ones(2))[2], torch.full((2,), 2.0))


def test_small_graphs_are_recompiled_whole(llama_graph):
    _, graph = llama_graph
    recompile(graph.module)  # the tiny Llama's graph is below the default PART_NODES
    assert _parts_of(graph.module) == 0


_REMEMBERED: list = []


def _remembered_neg(x: torch.Tensor) -> torch.Tensor:
    out = -x
    _REMEMBERED.append(weakref.ref(out))
    return out


def _alive(x: torch.Tensor) -> int:
    return sum(r() is not None for r in _REMEMBERED)


def _probe_graph() -> fx.GraphModule:
    """x -> a = -x (remembered), p = x + 1 | b = a + 1 (a's last use), alive -> (b, alive, p):
    with two nodes a part, a and p cross the cut and a is dead by the time `_alive` runs."""
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(_remembered_neg, (x,))
    p = g.call_function(torch.add, (x, 1))
    b = g.call_function(torch.add, (a, 1))
    alive = g.call_function(_alive, (b,))
    g.output((b, alive, p))
    return fx.GraphModule(nn.Module(), g)


def test_a_value_crossing_a_cut_is_freed_after_its_last_use(monkeypatch):
    """The caller of a part holds none of the values it hands over (plain CodeGen graph)."""
    gm = _probe_graph()
    _REMEMBERED.clear()
    assert gm(torch.ones(3))[1] == 0  # the whole-graph forward frees `a` after b
    monkeypatch.setattr(forward_parts, "PART_NODES", 2)
    recompile(gm)
    assert _parts_of(gm) == 2
    _REMEMBERED.clear()
    b, alive, p = gm(torch.ones(3))
    assert alive == 0
    assert torch.equal(b, torch.zeros(3)) and torch.equal(p, torch.full((3,), 2.0))


def test_a_part_empties_the_list_it_is_given():
    values = [torch.ones(1), 2]
    taken = forward_parts._take(values)
    assert values == [] and taken[1] == 2
