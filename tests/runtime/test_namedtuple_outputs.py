"""A model that returns a namedtuple: saved and loaded when its type has a serialized name in both
processes; otherwise each side says how to give it one (load blamed a damaged meta.json and said
to save again, which cannot help; save named only torch's private function)."""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import slimfx
from slimfx.runtime.artifact import ArtifactError

Pair = collections.namedtuple("Pair", ["a", "b"])
Unnamed = collections.namedtuple("Unnamed", ["a", "b"])
pytree._register_namedtuple(Pair, serialized_type_name="slimfx_tests.Pair")


class Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        return self.kind(h, h.relu())


def _compiled(kind):
    torch.manual_seed(0)
    return slimfx.compile(Returns(kind).eval(), "", example_inputs={"x": torch.randn(2, 8)})


def test_a_registered_namedtuple_output_is_saved_and_loaded(tmp_path):
    cm, x = _compiled(Pair), torch.randn(3, 8)
    cm.save(tmp_path / "m")
    out = slimfx.load(tmp_path / "m")(x)
    assert type(out) is Pair and torch.equal(out.b, cm(x).b)


def test_one_not_registered_where_it_is_loaded_is_named_with_how_to_register_it(tmp_path, monkeypatch):
    _compiled(Pair).save(tmp_path / "m")
    monkeypatch.delitem(pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE, "slimfx_tests.Pair")  # another process
    with pytest.raises(ArtifactError) as e:
        slimfx.load(tmp_path / "m")
    message = str(e.value)
    assert "'slimfx_tests.Pair' is not registered in this process" in message
    assert "_register_namedtuple" in message and "before slimfx.load" in message
    assert "damaged" not in message and "save it again" not in message


def test_one_without_a_serialized_name_is_refused_at_save_with_how(tmp_path):
    with pytest.raises(ArtifactError, match="give its type a serialized name .*_register_namedtuple.*or return a dict"):
        _compiled(Unnamed).save(tmp_path / "m")

