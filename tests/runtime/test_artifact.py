"""Artifacts: layout and meta.json, atomic save, refusal of damaged or tampered directories
with a specific message each, no unpickling, no code from the artifact, and a real model."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import slimfx
import slimfx.runtime.artifact as artifact
from runtime_tiny import assert_identical, compiled, refused, rehash
from slimfx.runtime.artifact import FILES, FORMAT_VERSION, ArtifactError, load
from slimfx.runtime.artifact_errors import RESAVE


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# ---- layout -----------------------------------------------------------------------------------


def test_meta_json(saved):
    meta = json.loads((saved("gpt2") / "meta.json").read_text())
    assert meta["format"] == "slimfx-artifact" and meta["format_version"] == FORMAT_VERSION
    assert meta["torch_version"] == torch.__version__ and meta["slimfx_version"]
    assert meta["model_class"] == "GPT2LMHeadModel"
    assert meta["policy"] == {"name": "tiny", "text": "policy tiny { keep embed }\n"}
    assert meta["report"]["rules"][0]["text"] == "keep embed"
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask"]
    assert meta["inputs"][0]["dims"] == {"0": "batch", "1": "seq"}
    assert meta["outputs"]["spec"][1]["type"].startswith("transformers.")
    assert meta["weights"]["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert set(meta["files"]) == set(FILES) - {"meta.json"}
    for name, rec in meta["files"].items():
        data = (saved("gpt2") / name).read_bytes()
        assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_weights_file_holds_the_programs_tensors(saved):
    cm = compiled("llama").cm
    stored = load_file(saved("llama") / "weights.safetensors")
    state = cm.program.state_dict()
    # Parameters and persistent buffers by their state-dict names; non-persistent buffers
    # (rotary inv_freq) are program constants and are stored too.
    assert set(state) <= set(stored)
    assert all(torch.equal(stored[k], v) for k, v in state.items())


def test_program_json_has_no_pickles_or_stack_traces(saved):
    text = (saved("llama") / "program.json").read_text()
    doc = json.loads(text)
    assert doc["format"] == "slimfx-graph" and "guards_code" not in text
    assert "stack_trace" not in text and "/site-packages/" not in text
    assert "_guards_fn" not in text  # export's guard checker is code: never stored
    assert "nn_module_stack" in text  # kept: the block index is built from it
    assert {n["op"] for n in doc["nodes"]} == {"placeholder", "get_attr", "call_function",
                                                "output"}


# ---- atomic save --------------------------------------------------------------------------------


def _failing_weights(monkeypatch):
    def fail(path, tensors):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "_write_weights", fail)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    _failing_weights(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        compiled("llama").cm.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_artifact(llama_dir, monkeypatch):
    before = {p.name: p.read_bytes() for p in llama_dir.iterdir()}
    _failing_weights(monkeypatch)
    with pytest.raises(OSError):
        compiled("llama").cm.save(llama_dir)
    assert {p.name: p.read_bytes() for p in llama_dir.iterdir()} == before
    assert [p.name for p in llama_dir.parent.iterdir()] == [llama_dir.name]
    monkeypatch.undo()
    x = compiled("llama").loaded.example_inputs
    assert_identical(load(llama_dir)(**x), compiled("llama").cm(**x))


def test_overwrite_replaces(llama_dir):
    compiled("llama").cm.save(llama_dir)
    assert sorted(p.name for p in llama_dir.iterdir()) == sorted(FILES)
    assert [p.name for p in llama_dir.parent.iterdir()] == [llama_dir.name]


def test_save_through_a_symlink_replaces_the_directory_it_names(llama_dir, tmp_path):
    """The link was replaced by a directory, its target left stale, a `.link.old-*` left beside."""
    link = tmp_path / "current"
    link.symlink_to(llama_dir, target_is_directory=True)
    (llama_dir / "weights.safetensors").write_bytes(b"stale")
    compiled("llama").cm.save(link)
    assert link.is_symlink() and sorted(p.name for p in llama_dir.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "llama"]
    load(llama_dir)  # the hashes agree: the new artifact is where the link points


def test_save_refuses_a_dangling_link_and_the_current_directory(tmp_path, monkeypatch):
    """Both failed after the compile, with a raw OSError (and `.` tried to rename the cwd)."""
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="symbolic link to .*nowhere, which does not exist"):
        artifact.check_target(dangling)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for path, says in ((".", "it is the current directory"), (str(work), "it is the current directory"),
                       ("..", "it is above the current directory")):
        with pytest.raises(ArtifactError, match=says):
            compiled("llama").cm.save(path)
    assert list(work.iterdir()) == []
    from slimfx.runtime.peft_format import PeftFormatError
    adapted = slimfx.compile(compiled("llama").loaded, "adapt blocks.*.attn.q lora rank=2")
    for path in (".", str(dangling)):  # save_adapters writes its folder the same way
        with pytest.raises(PeftFormatError, match="cannot save adapters to"):
            adapted.save_adapters(path)
    assert list(work.iterdir()) == [] and work.exists()


def test_overwrite_refuses_an_artifact_that_holds_other_files(llama_dir, tmp_path):
    """A save replaces the whole directory: the user's notes and data beside an artifact, or in a
    folder with a meta.json of its own, were deleted without a word."""
    (llama_dir / "README.txt").write_text("how this was made")
    (llama_dir / "eval").mkdir()
    with pytest.raises(ArtifactError, match=r"besides an artifact's files it holds README.txt, eval/, which saving"):
        compiled("llama").cm.save(llama_dir)
    assert (llama_dir / "README.txt").read_text() == "how this was made" and (llama_dir / "eval").is_dir()
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "meta.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not a slimfx artifact"):
        compiled("llama").cm.save(project)
    assert sorted(p.name for p in project.iterdir()) == ["data", "meta.json"]


@pytest.mark.parametrize("meta", ['{"experiment": "my run"}', '{"format": "other-tool"}', "not json", "[[["])
def test_a_folder_with_another_tools_meta_json_is_not_replaced(tmp_path, meta):
    """Only the names were compared: another tool's meta.json and weights.safetensors made the
    folder an artifact, and the save replaced it, their contents lost."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "meta.json").write_text(meta)
    (run / "weights.safetensors").write_bytes(b"mine")
    with pytest.raises(ArtifactError, match=r"not a slimfx artifact \(no meta.json of one\)"):
        compiled("llama").cm.save(run)
    assert (run / "meta.json").read_text() == meta and (run / "weights.safetensors").read_bytes() == b"mine"


def test_a_folder_under_an_artifact_files_name_is_not_replaced(llama_dir):
    (llama_dir / "program.json").unlink()
    (llama_dir / "program.json").mkdir()
    (llama_dir / "program.json" / "data.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"it holds program.json/, which saving"):
        compiled("llama").cm.save(llama_dir)
    assert (llama_dir / "program.json" / "data.txt").read_text() == "mine"


def test_save_refuses_to_replace_other_directories(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not a slimfx artifact"):
        compiled("llama").cm.save(tmp_path)
    with pytest.raises(ArtifactError, match="is a file"):
        compiled("llama").cm.save(tmp_path / "notes.txt")
    with pytest.raises(ArtifactError, match=r"notes.txt is a file, not a directory"):  # was FileExistsError
        compiled("llama").cm.save(tmp_path / "notes.txt" / "sub" / "dir")
    assert (tmp_path / "notes.txt").read_text() == "precious"


# ---- damaged artifacts --------------------------------------------------------------------------


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_weight_byte(llama_dir):
    _flip_byte(llama_dir / "weights.safetensors", -100)
    refused(llama_dir, "weights.safetensors does not match the SHA-256", RESAVE)


def test_edited_program(llama_dir):
    _flip_byte(llama_dir / "program.json", 1000)
    refused(llama_dir, "program.json does not match the SHA-256", RESAVE)


def test_truncated_weights(llama_dir):
    path = llama_dir / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    refused(llama_dir, "weights.safetensors is 5000 bytes", "truncated", RESAVE)


@pytest.mark.parametrize("name", ["program.json", "weights.safetensors"])
def test_missing_file(llama_dir, name):
    (llama_dir / name).unlink()
    refused(llama_dir, f"{name} is missing", "incomplete", RESAVE)


def test_not_an_artifact(tmp_path, llama_dir):
    refused(tmp_path / "nowhere", "no artifact at", "nothing is there")
    (tmp_path / "a-file").write_text("x")
    refused(tmp_path / "a-file", "no artifact at", "it is a file, not a directory")
    (llama_dir / "meta.json").unlink()
    refused(llama_dir, "is not a slimfx artifact", "no meta.json")


def test_bad_meta_json(llama_dir):
    (llama_dir / "meta.json").write_text('{"format": "slimfx-artifact", ')
    refused(llama_dir, "meta.json is not valid JSON", RESAVE)


def test_wrong_format_version(llama_dir):
    _edit_json(llama_dir / "meta.json", lambda m: m.update(format_version=FORMAT_VERSION + 1))
    refused(llama_dir, f"format version {FORMAT_VERSION + 1}", f"reads version {FORMAT_VERSION}")


def test_damaged_safetensors_header(llama_dir):
    path = llama_dir / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"  # the JSON header right after its 8-byte length
    path.write_bytes(bytes(data))
    rehash(llama_dir)  # past the hash check: the parser itself must refuse
    refused(llama_dir, "weights.safetensors is not a readable safetensors file", RESAVE)


def test_tensor_shape_mismatch(llama_dir):
    path = llama_dir / "weights.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :10].contiguous()
    save_file(tensors, path)
    rehash(llama_dir)
    refused(llama_dir, "'lm_head.weight'", "(256, 10)", "program expects", "(256, 64)")


def test_missing_tensor(llama_dir):
    path = llama_dir / "weights.safetensors"
    tensors = load_file(path)
    del tensors["model.norm.weight"]
    save_file(tensors, path)
    rehash(llama_dir)
    refused(llama_dir, "missing ['model.norm.weight']")


# ---- no pickle, no code from the artifact -------------------------------------------------------


def test_load_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load() must not unpickle")

    class Refuse:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    back = load(saved("bert"))
    monkeypatch.undo()
    x = compiled("bert").loaded.example_inputs
    assert_identical(back(**x), compiled("bert").cm(**x))


def _tamper_program(path: Path, edit) -> None:
    _edit_json(path / "program.json", edit)
    rehash(path)


def _nodes(doc):
    return doc["nodes"]


def test_refuses_module_calls(llama_dir):
    """export's `_guards_fn` submodule runs guard code: a graph may not call modules."""
    def edit(doc):
        _nodes(doc)[-2].update(op="call_module", target="_guards_fn")
    _tamper_program(llama_dir, edit)
    refused(llama_dir, "program.json is refused", "'call_module' node", "never runs code")


@pytest.mark.parametrize("target", [
    "torch.load", "torch.ops.load_library", "builtins.eval", "os.system",
    "operator.attrgetter", "torch.ops.aten.add.Tensor", "aten.add._Tensor",
])
def test_refuses_non_operator_targets(llama_dir, target):
    def edit(doc):
        next(n for n in _nodes(doc) if n["op"] == "call_function")["target"] = target
    _tamper_program(llama_dir, edit)
    refused(llama_dir, f"node target {target!r} is not an allowed operator", "never runs code")


def _symbolic_node(doc) -> dict:
    """A node whose value's first size is a symbol (the batch)."""
    return next(n for n in _nodes(doc) if "tensor" in (n.get("val") or {})
                and isinstance(n["val"]["tensor"][1][0], str))


def test_refuses_code_in_size_expressions(llama_dir, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch() or 2"

    def edit(doc):
        _symbolic_node(doc)["val"]["tensor"][1][0] = payload
    _tamper_program(llama_dir, edit)
    refused(llama_dir, "program.json is malformed", "is not in the symbol table", RESAVE)
    assert not marker.exists()

    def edit_function(doc):
        _symbolic_node(doc)["val"]["tensor"][1][0] = ["eval", payload]
    _tamper_program(llama_dir, edit_function)
    refused(llama_dir, "size function 'eval'", "not one slimfx rebuilds")
    assert not marker.exists()


def _tower(size, levels=6):
    for _ in range(levels):
        size = ["Pow", size, 64]
    return size


@pytest.mark.parametrize("size", [["Pow", 10, ["Pow", 10, 12]], ["LShift", 1, 10**12],
                                  ["Pow", 2, "s0"], 10**30, ["Mul", 2**62, 2**62], 2**63, "tower"])
def test_refuses_sizes_that_would_hang_load(llama_dir, size):
    """sympy works a literal power out exactly: 10**(10**12) would hang load(), not fail."""
    def edit(doc):
        node = _symbolic_node(doc)
        symbol = node["val"]["tensor"][1][0]
        size_ = {"tower": _tower(symbol)}.get(size, size) if not isinstance(size, list) else size
        size_ = ["Pow", 2, symbol] if size == ["Pow", 2, "s0"] else size_
        node["val"]["tensor"][1][0] = size_
    _tamper_program(llama_dir, edit)
    refused(llama_dir, "program.json is malformed", RESAVE)


def test_refuses_a_huge_size_hint(llama_dir):
    def edit(doc):
        doc["symbols"] = {k: 10**30 for k in doc["symbols"]}
    _tamper_program(llama_dir, edit)
    refused(llama_dir, "has hint 1000000000000000000000000000000, not a size")


def test_refuses_code_in_names(llama_dir):
    def edit(doc):
        _nodes(doc)[5]["name"] = "x = __import__('os')"
    _tamper_program(llama_dir, edit)
    refused(llama_dir, "node name \"x = __import__('os')\" is not a plain name")


def test_refuses_code_in_tensor_paths(llama_dir):
    def edit(doc):
        doc["tensors"][0]["path"] = 'model.x"); import os; ("'
    _tamper_program(llama_dir, edit)
    refused(llama_dir, "tensor path", "is not a dotted name")


def test_refuses_foreign_output_types(llama_dir):
    def edit(meta):
        meta["outputs"]["spec"][1]["type"] = "os.system"
    _edit_json(llama_dir / "meta.json", edit)
    refused(llama_dir, "'os.system' is not registered in this process", "imports no other names")


def test_refuses_renamed_inputs(llama_dir):
    _edit_json(llama_dir / "meta.json", lambda m: m["inputs"][0].update(name="ids"))
    refused(llama_dir, "inputs ['input_ids', 'attention_mask'] are not meta.json's")


# ---- a real model -------------------------------------------------------------------------------


@pytest.mark.realmodel
def test_minilm_round_trip(tmp_path):
    from slimfx import models
    from slimfx.passes.capture import capture
    from slimfx.runtime.compiled import CompiledModel
    from slimfx.runtime.report import Report

    lm = models.load("minilm-l6")
    graph = capture(lm.model, lm.example_inputs)
    cm = CompiledModel(graph, report=Report(None, graph.model_class))
    cm.save(tmp_path / "minilm")
    back = load(tmp_path / "minilm")
    for texts in (["one short sentence"], ["a", "batch of three", "sentences of other lengths"]):
        x = lm.encode(texts)
        assert_identical(back(**x), cm(**x), "minilm")
    assert (tmp_path / "minilm" / "weights.safetensors").stat().st_size < 1.01 * cm.weight_bytes()


# ---- files that hash right but do not fit -----------------------------------------------------


def test_meta_without_required_keys(llama_dir):
    _edit_json(llama_dir / "meta.json", lambda m: m.pop("modules"))
    refused(llama_dir, "lacks ['modules']", "damaged", RESAVE)


def test_meta_with_a_damaged_file_entry(llama_dir):
    """It was a raw AttributeError ('str' object has no attribute 'get')."""
    _edit_json(llama_dir / "meta.json", lambda m: m["files"].update({"program.json": "damaged"}))
    refused(llama_dir, "records program.json as 'damaged', not its size and SHA-256", RESAVE)


def test_program_that_is_not_a_program(llama_dir):
    _tamper_program(llama_dir, lambda d: d.pop("format"))
    refused(llama_dir, "program.json is not a slimfx graph", RESAVE)


def test_format_version_1(llama_dir):
    """Version 1 stored torch.export's schema; it is refused before anything is parsed."""
    _edit_json(llama_dir / "meta.json", lambda m: m.update(format_version=1))
    e = refused(llama_dir, "format version 1 (version 1 stored the graph in torch.export's format",
                f"reads version {FORMAT_VERSION}: compile the original model with its policy again")
    # it sent the user to "the slimfx that wrote it (0.1.0)": the one they were running
    assert "that wrote it" not in str(e) and "under this one, or recompile" not in str(e)


def test_a_newer_format_says_to_upgrade(llama_dir):
    _edit_json(llama_dir / "meta.json", lambda m: m.update(format_version=FORMAT_VERSION + 1, slimfx_version="9.0"))
    refused(llama_dir, f"format version {FORMAT_VERSION + 1}", "slimfx 9.0 wrote it: upgrade")


def test_inconsistent_meta_is_an_artifact_error(llama_dir):
    """Written by this slimfx and torch: damaged, not another version to load it with."""
    _edit_json(llama_dir / "meta.json", lambda m: m["modules"][0].pop("children"))
    e = refused(llama_dir, "cannot be restored (KeyError", "meta.json was changed or damaged after saving", RESAVE)
    assert "load it there" not in str(e)
    _edit_json(llama_dir / "meta.json", lambda m: m.update(torch_version="1.0"))
    refused(llama_dir, "cannot be restored (KeyError", "saved by slimfx 0.1.0 with torch 1.0", "load it there")


def test_meta_nested_too_deeply_is_an_artifact_error(llama_dir):
    (llama_dir / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(llama_dir, "nested too deeply", RESAVE)
