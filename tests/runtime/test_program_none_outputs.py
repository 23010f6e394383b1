"""A model output that holds None (`return h, None`): capture once stored None for "a tensor
goes here", so the real None took a tensor too and every call died of a bare StopIteration."""
from __future__ import annotations

import json

import torch
from torch import nn

import slimfx
from slimfx.runtime.artifact import load


class TupleWithNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return self.l(x), None


class NestedNone(TupleWithNone):
    def forward(self, x):
        h = self.l(x)
        return {"c": [h, (h * 2, None)], "n": None}


def _model(cls):
    torch.manual_seed(0)
    return cls().eval()


def test_a_none_output_is_returned_in_place():
    m, x = _model(TupleWithNone), torch.randn(2, 4)
    cm = slimfx.compile(m, "", example_inputs=x)
    with torch.no_grad():
        out, ref = cm(x), m(x)
    assert out[1] is None and torch.equal(out[0], ref[0])


def test_a_nested_none_output_is_returned_in_place():
    m, x = _model(NestedNone), torch.randn(3, 4)
    cm = slimfx.compile(m, "", example_inputs=x)
    with torch.no_grad():
        out, ref = cm(x), m(x)
    assert out["n"] is None and out["c"][1][1] is None
    assert torch.equal(out["c"][0], ref["c"][0]) and torch.equal(out["c"][1][0], ref["c"][1][0])


def test_save_and_load_keep_a_none_output(tmp_path):
    m, x = _model(NestedNone), torch.randn(2, 4)
    slimfx.compile(m, "", example_inputs=x).save(tmp_path / "a")
    out = load(tmp_path / "a")(x)
    with torch.no_grad():
        assert out["n"] is None and out["c"][1][1] is None and torch.equal(out["c"][0], m(x)["c"][0])


def test_an_artifact_saved_before_the_marker_still_loads(tmp_path):
    """Older meta.json has no "tensors": each None constant there is a tensor."""
    m, x = _model(TupleWithNone), torch.randn(2, 4)
    slimfx.compile(nn.Sequential(m.l).eval(), "", example_inputs=x).save(tmp_path / "a")
    meta_path = tmp_path / "a" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["outputs"]["tensors"]
    meta_path.write_text(json.dumps(meta))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "a")(x), m.l(x))
