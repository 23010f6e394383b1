"""capture()'s module table with a module reachable by two paths (`ModuleList([blk, blk, …])`,
or `self.blk` also in `self.layers`): the de-duplicated table lacked the second path, so select
raised a bare KeyError ('layers.0') or resolved `layers[1]` to `layers.2`."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import slimfx
from slimfx.dsl.errors import SpecError
from slimfx.passes.capture import capture


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Repeated(nn.Module):
    """One block twice in the list, then another: `layers[1]` is the first block again."""

    def __init__(self):
        super().__init__()
        blk = Block()
        self.layers = nn.ModuleList([blk, blk, Block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class AlsoAnAttribute(Repeated):
    """The first block is also `self.blk`, registered before the list."""

    def __init__(self):
        super().__init__()
        del self.layers, self.head
        self.blk = Block()
        self.layers = nn.ModuleList([self.blk, Block(), Block()])
        self.head = nn.Linear(8, 2)


def _x():
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def test_every_path_of_a_shared_module_is_in_the_table():
    torch.manual_seed(0)
    g = capture(AlsoAnAttribute(), {"x": _x()})
    assert {"blk.fc1", "layers.0.fc1", "layers.1.fc1", "layers.2.fc1"} <= set(g.modules)
    assert g.modules["layers"].children == ("0", "1", "2")
    same = {p.storage for path in ("blk.fc1", "layers.0.fc1") for p in g.modules[path].params if p.name.endswith("weight")}
    assert len(same) == 1  # one tensor under two paths: tied


def test_rules_select_a_shared_module_by_each_of_its_paths():
    torch.manual_seed(0)
    m = AlsoAnAttribute().eval()
    for rule, want in [("quantize layers[0].fc1 int8", ("layers.0.fc1",)),
                       ("quantize layers.*.fc1 int8", ("layers.0.fc1", "layers.1.fc1", "layers.2.fc1"))]:
        cm = slimfx.compile(m, rule, example_inputs={"x": _x()})
        assert cm.report.rules[0].targets == want
    with torch.no_grad():
        assert (cm(_x()) - m(_x())).abs().max() < 0.05


def test_an_index_into_a_repeated_list_is_not_shifted():
    torch.manual_seed(0)
    m = Repeated().eval()
    cm = slimfx.compile(m, "quantize layers[1].fc1 int8", example_inputs={"x": _x()})
    rule = cm.report.rules[0]
    assert rule.targets == ("layers.1.fc1",)
    assert any("tied" in n for n in rule.notes)  # layers[0] reads the same weight, unquantized
    cm = slimfx.compile(m, "quantize ** : Linear int8", example_inputs={"x": _x()})
    assert "layers.0.fc1" in cm.report.rules[0].targets


def test_the_path_the_forward_does_not_use_names_the_one_it_does():
    torch.manual_seed(0)
    m = AlsoAnAttribute().eval()
    with pytest.raises(SpecError) as e:
        slimfx.compile(m, "quantize blk.fc1 int8", example_inputs={"x": _x()})
    assert e.value.kind == "selector"
    assert "`blk.fc1` is `layers.0.fc1`" in str(e.value) and "the path the forward uses" in str(e.value)
    with pytest.raises(SpecError) as e:  # a whole aliased block: each of its linears
        slimfx.compile(m, "quantize blk.* int8", example_inputs={"x": _x()})
    assert "`blk.fc2` is `layers.0.fc2`" in str(e.value)
