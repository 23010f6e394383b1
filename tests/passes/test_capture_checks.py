"""Checks on what capture is given and returns (passes/capture_checks.py): names, nested
inputs, size-1 examples the model branches on, outputs pytree cannot open."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import slimfx
from slimfx.dsl.errors import SpecError
from slimfx.models import tiny
from slimfx.passes.capture import capture


def test_an_output_class_pytree_cannot_open_is_refused_and_works_once_registered():
    """An unregistered dataclass output was kept as a constant: every call returned the object
    seen while tracing, its fields fake tensors of symbolic size."""
    @dataclasses.dataclass
    class Pair:
        logits: torch.Tensor
        hidden: torch.Tensor

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            h = self.a(x)
            return Pair(self.b(h), h)

    model = Two().eval()
    with pytest.raises(SpecError) as e:
        slimfx.compile(model, "", example_inputs={"x": torch.randn(2, 8)})
    assert "returns a `Pair` holding tensors" in e.value.message
    assert "torch.export.register_dataclass(Pair)" in e.value.hint
    torch.export.register_dataclass(Pair)
    try:
        cm = slimfx.compile(model, "", example_inputs={"x": torch.randn(2, 8)})
        x = torch.randn(5, 8)
        with torch.no_grad():
            out, want = cm(x=x), model(x)
        assert type(out) is Pair and torch.equal(out.logits, want.logits) and torch.equal(out.hidden, want.hidden)
    finally:
        torch.utils._pytree._deregister_pytree_node(Pair)


class _BranchOnOnePosition(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.a = nn.Embedding(50, 16), nn.Linear(16, 4)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        if input_ids.shape[1] == 1:  # a decode-step path
            h = h * 0
        return self.a(h)


def test_an_example_of_size_one_the_model_branches_on_is_refused():
    """Traced at size 2 in its place, the graph held only the other branch: 0.77 off on the example
    itself, silently."""
    with pytest.raises(SpecError) as e:
        slimfx.compile(_BranchOnOnePosition().eval(), "", example_inputs={"input_ids": torch.randint(0, 50, (2, 1))})
    assert "computes otherwise at the example's sizes (input_ids [2, 1])" in e.value.message
    assert "at least 2 rows and 2 positions" in e.value.hint
    ids = torch.randint(0, 50, (2, 3))
    cm = slimfx.compile(_BranchOnOnePosition().eval(), "", example_inputs={"input_ids": ids})
    with torch.no_grad():
        assert torch.equal(cm(input_ids=ids), _BranchOnOnePosition().eval()(ids))
    lm = tiny("llama", layers=1)  # a model without such a branch compiles from a 1×1 example as before
    one = {k: v[:1, :1] for k, v in lm.example_inputs.items()}
    with torch.no_grad():
        assert torch.allclose(slimfx.compile(lm.model, "", example_inputs=one)(**one).logits,
                              lm.model(**one).logits, atol=1e-5)


class _WithLength(nn.Module):
    def __init__(self, dims: bool = True):
        super().__init__()
        self.embed, self.dims = nn.Embedding(50, 8), dims

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return {"hidden": h, "length": input_ids.shape[1], "half": input_ids.shape[1] / 2} if self.dims else \
            {"hidden": h, "width": 8}


def test_an_output_number_read_from_the_inputs_sizes_is_refused_by_name():
    """It came back as the tracer's symbol (`s70`, whose int() was the example's length, 5, on a
    call of length 9) on every call, and the artifact could not be saved."""
    with pytest.raises(SpecError) as e:
        slimfx.compile(_WithLength().eval(), "", example_inputs={"input_ids": torch.randint(0, 50, (2, 5))})
    assert e.value.kind == "unsupported"
    assert "returns an int computed from its inputs' sizes" in e.value.message and "torch.tensor(" in e.value.hint
    # a number that is the same on every call stays a constant output
    cm = slimfx.compile(_WithLength(dims=False).eval(), "", example_inputs={"input_ids": torch.randint(0, 50, (2, 5))})
    with torch.no_grad():
        assert cm(torch.randint(0, 50, (1, 9)))["width"] == 8


def test_an_example_input_of_a_list_of_tensors_is_refused_by_name():
    """It became a constant of the graph, or (alone) "no tensor among the example inputs"."""
    class Pairwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, xs, scale=1.0):
            return self.a(xs[0] + xs[1]) * scale

    pair = [torch.randn(2, 4), torch.randn(2, 4)]
    for example in ({"xs": pair}, (pair,), {"xs": {"a": pair[0]}, "scale": 2.0}):
        with pytest.raises(TypeError, match="example input xs is a (list|dict) holding tensors: the graph takes"):
            capture(Pairwise(), example)


def test_example_names_forward_does_not_take_or_needs_are_said_before_tracing():
    """torch.export's TypeError came with a hint to make the model traceable."""
    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.a(x + y)

    t = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"Sum.forward\(x, y\) and the example inputs \['x', 'z'\] disagree: "
                                        r"it does not take \['z'\]; it needs \['y'\]"):
        capture(Sum(), {"x": t, "z": t})
    with pytest.raises(TypeError, match=r"disagree: it needs \['y'\]"):
        capture(Sum(), {"x": t})


def test_an_example_of_size_one_whose_outputs_hold_inf_is_compared_as_the_model_computes_them():
    """A masked -inf in the same place in both made the difference NaN, and the model was refused
    as branching on a size of 1."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)

        def forward(self, x):
            y = self.a(x)
            return y.masked_fill(y < 0, float("-inf"))

    model, x = Masked().eval(), torch.randn(1, 16)
    with torch.no_grad():
        assert torch.equal(slimfx.compile(model, "", example_inputs={"x": x})(x=x), model(x))


class _PositionalOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, /, scale=2.0):
        return self.lin(x) * scale


@pytest.mark.parametrize("example", ["tuple", "dict"])
def test_a_positional_only_input_is_passed_by_position(example):
    """forward(self, x, /) was called with x=…: "positional-only arguments passed as keyword
    arguments", blamed on torch.export and the model."""
    model, x = _PositionalOnly(), torch.randn(3, 8)
    cm = slimfx.compile(model, "quantize lin int8", example_inputs=(x,) if example == "tuple" else {"x": x})
    other = torch.randn(5, 8)
    assert torch.allclose(cm(other), model(other), atol=0.05) and not torch.equal(cm(other), model(other))
    assert torch.equal(slimfx.compile(model, example_inputs=(x,))(other), model(other))


class _Star(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, *xs):
        return self.lin(xs[0])


@pytest.mark.parametrize("example", ["one", "two", "named"])
def test_star_args_are_refused_with_what_to_do(example):
    """A tuple was told "pass a dict of named inputs", and the dict then died inside export
    ("unexpected keyword argument 'xs'"): no form worked, and none said why."""
    x = torch.randn(3, 8)
    given = {"one": (x,), "two": (x, x), "named": {"xs": x}}[example]
    with pytest.raises(TypeError, match=r"takes \*xs, and slimfx names every input of the graph: wrap the model"):
        slimfx.compile(_Star(), example_inputs=given)


@pytest.mark.parametrize("arch, fills", [("roberta", False), ("opt", False), ("llama", True)])
def test_position_ids_are_filled_only_where_the_model_counts_them_so(arch, fills, tmp_path):
    """Left out, position_ids were filled with 0, 1, 2, …: RoBERTa numbers them from its padding
    index (2.6 off with no padding at all), OPT from the mask's running sum (0.38 off when
    left-padded), silently. Where the model counts them so (Llama) they are still filled."""
    model = tiny(arch).model
    offset = 2 if arch == "roberta" else 0  # RoBERTa's own positions start after its padding index
    example = {"input_ids": torch.randint(3, 250, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
               "position_ids": torch.arange(8).expand(2, 8) + offset}
    cm = slimfx.compile(model, example_inputs=example)
    ids, mask = torch.randint(3, 250, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    cm.save(tmp_path / "a")
    for compiled in (cm, slimfx.load(tmp_path / "a")):
        assert [i.fill for i in compiled.graph.inputs if i.name == "position_ids"] == [fills]
        if fills:
            got, want = compiled(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits
            assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)
        else:
            with pytest.raises(TypeError, match=r"missing \['position_ids'\].*not filled in when left out: the model "
                                                 r"numbers positions its own way"):
                compiled(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("arch, fills", [("gpt2", False), ("bert", True)])
def test_token_type_ids_are_filled_only_where_zeros_compute_what_leaving_them_out_does(arch, fills):
    """Left out, token_type_ids were filled with zeros: GPT-2 adds no type embedding without them,
    and zeros add its first row to every token (0.41 off, silently). BERT's are zeros."""
    model = tiny(arch).model
    ids = torch.randint(3, 250, (2, 8))
    cm = slimfx.compile(model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                               "token_type_ids": torch.zeros_like(ids)})
    assert [i.fill for i in cm.graph.inputs if i.name == "token_type_ids"] == [fills]
    other = torch.randint(3, 250, (3, 5))
    mask = torch.ones_like(other)
    with torch.no_grad():
        if fills:
            torch.testing.assert_close(cm(input_ids=other, attention_mask=mask)[0], model(input_ids=other,
                                                                                      attention_mask=mask)[0])
        else:
            with pytest.raises(TypeError, match=r"missing \['token_type_ids'\].*GPT-2 adds no type embedding"):
                cm(input_ids=other, attention_mask=mask)
        types = torch.ones_like(other) if arch == "bert" else torch.zeros_like(other)
        torch.testing.assert_close(cm(input_ids=other, attention_mask=mask, token_type_ids=types)[0],
                                   model(input_ids=other, attention_mask=mask, token_type_ids=types)[0])


class _Counting(nn.Module):
    def __init__(self, from_mask: bool):
        super().__init__()
        self.emb, self.pos, self.out = nn.Embedding(50, 16), nn.Embedding(64, 16), nn.Linear(16, 50)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.from_mask = from_mask

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.calls += 1
        if position_ids is None and self.from_mask:  # as OPT numbers them
            position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
        elif position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return self.out(self.emb(input_ids) + self.pos(position_ids))


@pytest.mark.parametrize("from_mask", [False, True])
def test_the_fill_check_runs_a_model_that_writes_its_own_buffers_on_a_copy(from_mask):
    """It ran the user's model twice, and its counter moved from 0 to 2; skipping the check left
    positions a model numbers from its mask filled as 0, 1, 2, … (2.09 off, silently)."""
    torch.manual_seed(0)
    model, ids = _Counting(from_mask).eval(), torch.randint(0, 50, (2, 6))
    cm = slimfx.compile(model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                               "position_ids": torch.arange(6).expand(2, 6)})
    assert model.calls.item() == 0
    assert [i.fill for i in cm.graph.inputs if i.name == "position_ids"] == [not from_mask]


class _StarAndKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, *args, **kwargs):
        return self.lin(kwargs["x"])


def test_star_args_beside_keywords_take_named_inputs():
    """With **kwargs beside *args a dict of named inputs reaches forward: it is not refused."""
    model, x = _StarAndKeywords(), torch.randn(3, 8)
    assert torch.equal(slimfx.compile(model, example_inputs={"x": x})(x=x), model(x=x))
