"""program.json as slimfx's own graph format (runtime/graph_io.py): every argument kind round
trips, a loaded model re-saves, loaded values are symbolic fake tensors, and a tampered or
malformed program.json is refused with an ArtifactError that says what to do. Also: artifact
files are as readable as any saved model (0644 under umask 022)."""
from __future__ import annotations

import json
import math
import operator
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import fx

from runtime_tiny import assert_identical, compiled, other_inputs, refused, rehash
from slimfx.passes.capture import capture
from slimfx.runtime.artifact import ArtifactError, load
from slimfx.runtime.artifact_errors import RESAVE
from slimfx.runtime.compiled import CompiledModel
from slimfx.runtime.graph_io import decode_graph, encode_graph
from slimfx.runtime.report import Report

aten = torch.ops.aten


def _tamper(path: Path, edit) -> None:
    doc = json.loads((path / "program.json").read_text())
    edit(doc)
    (path / "program.json").write_text(json.dumps(doc))
    rehash(path)


def _first(doc, op: str) -> dict:
    return next(n for n in doc["nodes"] if n["op"] == op)


# ---- round trips ------------------------------------------------------------------------------


def _every_argument_kind() -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    full = g.call_function(aten.full.default, ([2, 3], -math.inf),
                           {"dtype": torch.float32, "layout": torch.strided,
                            "device": torch.device("cpu"), "pin_memory": False})
    clamped = g.call_function(aten.clamp.default, (x, -1e30, math.inf))
    half = g.call_function(aten.to.dtype, (clamped, torch.float16))
    back = g.call_function(aten._to_copy.default, (half,), {"dtype": torch.float32,
                                                             "memory_format": torch.preserve_format})
    div = g.call_function(aten.div.Tensor_mode, (back, 3.0), {"rounding_mode": "floor"})
    parts = g.call_function(aten.split.Tensor, (div, 1))
    first = g.call_function(operator.getitem, (parts, 0))
    cat = g.call_function(aten.cat.default, ([first, full], 0))
    g.output((cat, div))
    return fx.GraphModule(torch.nn.Module(), g)


def test_every_argument_kind_round_trips():
    gm = _every_argument_kind()
    doc, tensors, aliases = encode_graph(gm, "test graph")
    assert tensors == {} and aliases == {}
    text = json.dumps(doc, allow_nan=False)  # strict JSON: inf is spelled {"float": "inf"}
    back = decode_graph(json.loads(text), {})
    x = torch.randn(2, 3) * 100
    for got, want in zip(back(x), gm(x), strict=True):
        assert torch.equal(got, want)
    assert [n.format_node() for n in back.graph.nodes] == [n.format_node() for n in gm.graph.nodes]


def test_loaded_model_resaves(llama_dir, tmp_path):
    case = compiled("llama")
    back = load(llama_dir)
    back.save(tmp_path / "again")
    again = load(tmp_path / "again")
    for x in (case.loaded.example_inputs, other_inputs(case.loaded, batch=2, seq=9)):
        assert_identical(again(**x), case.cm(**x), "re-saved llama")
    # the same files: export and each load's ShapeEnv number size symbols by their own counters
    # (s72 and s53, then s45 and s70), which program.json and meta.json wrote as they were
    again.save(tmp_path / "third")
    for name in ("program.json", "meta.json", "weights.safetensors"):
        first = (llama_dir / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == first == (tmp_path / "third" / name).read_bytes(), name
    doc = json.loads((llama_dir / "program.json").read_text())
    assert list(doc["symbols"]) == [f"s{i}" for i in range(len(doc["symbols"]))]
    sizes = [i["shape"] for i in json.loads((llama_dir / "meta.json").read_text())["inputs"]]
    assert sizes == [n["val"]["tensor"][1] for n in doc["nodes"] if n["op"] == "placeholder"]


def test_loaded_values_are_symbolic_fakes(llama_dir):
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor

    gm = load(llama_dir).program
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert vals and all(isinstance(v, FakeTensor) for v in vals)
    mode = detect_fake_mode(vals)  # one mode: a pass can run fake kernels on the loaded graph
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"]
    assert all(isinstance(s, torch.SymInt) for s in ids.shape)  # batch and seq stay dynamic
    with mode:
        assert (ids.new_zeros(ids.shape) + 1).shape == ids.shape


def test_save_refuses_python_functions_in_the_graph(tmp_path):
    case = compiled("llama")
    graph = capture(case.loaded.model, case.loaded.example_inputs)  # a private copy
    node = next(n for n in graph.module.graph.nodes if n.target is aten.silu.default)
    node.target = torch.nn.functional.silu
    cm = CompiledModel(graph, report=Report(None, graph.model_class))
    with pytest.raises(ArtifactError, match="calls torch.nn.functional.silu, which is not an "
                                            "aten, prims or slimfx operator"):
        cm.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---- file modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                        (0o027, 0o640, 0o750)])
def test_files_are_readable_like_any_saved_model(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        compiled("llama").cm.save(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == dir_mode
    for p in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p.name


# ---- tampered or malformed program.json -----------------------------------------------------------


@pytest.mark.parametrize("target, words", [
    ("aten.no_such_op.default", ["'aten.no_such_op.default'", "does not have",
                                 "load it with the torch that saved it"]),
    ("aten.add.no_such_overload", ["does not have"]),
    ("aten.__class__.default", ["does not have"]),
    ("slimfx.quant_linear_v9.default", ["needs a newer slimfx (upgrade it)"]),
    ("mylib.op.default", ["is not an allowed operator", "never runs code"]),
    ("operator.attrgetter", ["is not an allowed operator"]),
    ("getattr", ["is not an allowed operator"]),
])
def test_unknown_or_foreign_operators(llama_dir, target, words):
    _tamper(llama_dir, lambda d: _first(d, "call_function").update(target=target))
    refused(llama_dir, *words)


def test_get_attr_outside_the_tensors(llama_dir):
    _tamper(llama_dir, lambda d: _first(d, "get_attr").update(target="training"))
    refused(llama_dir, "get_attr training names no tensor", RESAVE)
    _tamper(llama_dir, lambda d: _first(d, "get_attr").update(target="model.__class__"))
    refused(llama_dir, "'model.__class__' is not a dotted name", "never runs code")


def _set_arg(doc, value):
    _first(doc, "call_function")["args"][0] = value


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(nodes={"not": "a list"}), ["malformed"]),
    (lambda d: d["nodes"][3].pop("op"), ["malformed at node 3", "KeyError"]),
    (lambda d: _set_arg(d, {"node": "nowhere"}), ["refers to node 'nowhere' before it exists"]),
    (lambda d: _set_arg(d, {"eval": "1+1"}), ["an argument of kind 'eval'"]),
    (lambda d: _set_arg(d, {"dtype": "os.system"}), ["unknown dtype 'os.system'"]),
    (lambda d: _set_arg(d, {"device": "cpu; rm -rf /"}), ["unknown device"]),
    (lambda d: _set_arg(d, json.loads("[" * 50 + "]" * 50)), ["nested deeper than 16"]),
    (lambda d: _first(d, "call_function").update(val={"pickle": "gASVAAAA"}),
     ["a value of kind 'pickle'"]),
    (lambda d: d["nodes"].pop(), ["the graph has no output node"]),
    (lambda d: d["nodes"].insert(0, d["nodes"][0]), ["is used twice"]),
    (lambda d: d.update(symbols={"s0; import os": 2}), ["size symbol 's0; import os'"]),
    (lambda d: d.update(symbols={k: "2" for k in d["symbols"]}), ["has hint '2', not a size"]),
    (lambda d: d["tensors"][0].update(kind="pickle"), ["of kind 'pickle'"]),
    (lambda d: d["tensors"][0].update(data="nothing"), ["missing ['nothing']"]),
    (lambda d: d["modules"].append("model.forward"), ["shadows an attribute"]),
])
def test_malformed_program(llama_dir, edit, words):
    _tamper(llama_dir, edit)
    message = refused(llama_dir, *words)
    assert message.startswith("program.json") or "weights.safetensors" in message
    assert RESAVE in message


def test_program_that_is_not_json(llama_dir):
    (llama_dir / "program.json").write_text('{"format": "slimfx-graph", "nodes": [')
    rehash(llama_dir)
    refused(llama_dir, "program.json is not valid JSON", RESAVE)


class _Builtin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, input):  # fx names the placeholder `input_1`
        return self.lin(input)


def test_an_input_named_like_a_builtin_resaves_the_same_meta(tmp_path):
    """meta.json looked its input sizes up by node name (`input_1`), missed `input`, and wrote the
    capture's own symbol names: save -> load -> save gave another meta.json."""
    import slimfx

    cm = slimfx.compile(_Builtin(), "", example_inputs=(torch.randn(2, 5, 8),))
    cm.save(tmp_path / "a")
    load(tmp_path / "a").save(tmp_path / "b")
    assert (tmp_path / "a" / "meta.json").read_bytes() == (tmp_path / "b" / "meta.json").read_bytes()
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["inputs"][0]["shape"] == ["s0", 5, 8]


def test_symbols_first_seen_together_are_named_by_hint_not_by_their_old_names():
    """A load names its symbols by a hash (s96, s89): sorted as text, they swapped at the next save."""
    from slimfx.runtime.graph_io_values import SymbolNames, ValueDecoder, encode_val

    for names in (("s0", "s1"), ("s1", "s0"), ("s96", "s89")):
        decoder = ValueDecoder({names[0]: 2, names[1]: 3})
        value = decoder.decode({"symint": ["Mul", names[0], names[1]]})
        symbols = SymbolNames([value])
        assert symbols.table == {"s0": 2, "s1": 3} and encode_val(value, symbols) == {"symint": ["Mul", "s0", "s1"]}
