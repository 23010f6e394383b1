"""meta.json against the program at load (no hash covers meta.json): an edited output count or
structure, or a stray declared flag, loaded without a word, then every call failed with a raw
error; a required entry of the wrong kind. And what load blames: an unreadable file is said as
one, a backend's own failure is not put on the files, and "cuda" beside "cuda:0" is one device."""
from __future__ import annotations

import json

import pytest
from runtime_tiny import refused


def _edit_meta(root, edit) -> None:
    path = root / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_an_output_count_that_is_not_the_programs_is_refused_at_load(llama_dir):
    def one_tensor_less(meta):
        tensors = meta["outputs"]["tensors"]
        tensors[tensors.index(True)] = False
    _edit_meta(llama_dir, one_tensor_less)
    refused(llama_dir, "meta.json names 0 output tensor(s) and program.json returns 1",
            "meta.json was changed or damaged after saving")


def test_a_declared_flag_its_call_does_not_hold_is_refused_at_load(llama_dir):
    _edit_meta(llama_dir, lambda meta: meta["call"].update(declared={"logits_to_keep": 0}))
    refused(llama_dir, "declares a default for ['logits_to_keep']", "meta.json was changed or damaged")


@pytest.mark.parametrize("key, value, kind", [("files", "x", "a non-empty dict"),
                                              ("model_class", None, "a non-empty str"),
                                              ("model_class", "", "a non-empty str"), ("modules", {}, "a list")])
def test_a_required_entry_of_the_wrong_kind_is_called_damaged(llama_dir, key, value, kind):
    """`files: "x"` was reported as every file truncated ("records None"), and `model_class: null`
    loaded, to be taken at eval for a model of another class."""
    _edit_meta(llama_dir, lambda meta: meta.update({key: value}))
    refused(llama_dir, f"holds {key}: {value!r}, not {kind}: it is damaged", "save it again")


def test_an_output_structure_of_more_leaves_than_its_constants_is_refused_at_load(llama_dir):
    """A second leaf (`loss`) added to the spec loaded; then every call raised treespec's raw
    "leaves has length 1 but the spec … holds 2 items"."""
    def loss_too(meta):
        node = meta["outputs"]["spec"][1]
        node["context"] = '["loss", "logits"]'
        node["children_spec"] = node["children_spec"] * 2
    _edit_meta(llama_dir, loss_too)
    refused(llama_dir, "output structure has 2 leaves and its constants 1: it is damaged", "save it again")


def test_a_file_size_that_is_not_a_number_is_called_damaged(llama_dir):
    """"bytes": "150900" was reported as "is 150900 bytes but meta.json records 150900"."""
    def as_text(meta):
        entry = meta["files"]["program.json"]
        entry["bytes"] = str(entry["bytes"])
    _edit_meta(llama_dir, as_text)
    refused(llama_dir, "records program.json's size as '", "not a number of bytes: it is damaged")


def test_an_unreadable_file_is_an_artifact_error_that_says_so(llama_dir, monkeypatch):
    """Another user's meta.json of mode 0600 gave a raw PermissionError (load promises an
    ArtifactError for whatever goes wrong). Denied here by patching: the suite may run as root."""
    from pathlib import Path

    real = Path.read_bytes

    def denied(self):
        if self.name == "meta.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", denied)
    refused(llama_dir, "cannot read", "meta.json (Permission denied): check that this user may read the artifact")


def test_a_backend_that_fails_at_load_is_not_blamed_on_the_files(llama_dir, monkeypatch):
    """Whatever making the CompiledModel raised (lowering, no triton) was reported as "meta.json
    was changed or damaged after saving"."""
    import slimfx.runtime.artifact as artifact

    def lowering_fails(*args, **kwargs):
        raise ImportError("No module named 'triton'")
    monkeypatch.setattr(artifact, "CompiledModel", lowering_fails)
    with pytest.raises(ImportError, match="No module named 'triton'"):
        artifact.load(llama_dir)


def test_cuda_beside_cuda_0_is_one_device(monkeypatch):
    """A forward's literal device="cuda" beside export's checks on cuda:0 was refused at load as
    "names several devices"; two indexes still are."""
    import torch
    from torch import fx

    import slimfx.runtime.artifact as artifact

    def graph(*devices):
        g = fx.Graph()
        for d in devices:
            g.call_function(torch.ops.aten.zeros.default, ([1],), {"device": torch.device(d)})
        g.output(None)
        gm = fx.GraphModule(torch.nn.Module(), g)
        moved = []
        monkeypatch.setattr(gm, "to", lambda device: moved.append(device))
        return gm, moved

    gm, moved = graph("cuda", "cuda:0", "cpu")
    artifact._to_named_device(gm)
    assert moved == [torch.device("cuda:0")]
    for devices in (("cuda:0", "cuda:1"), ("cuda", "cuda:1")):  # "cuda" is the current device: 0
        gm, moved = graph(*devices)
        with pytest.raises(artifact.ArtifactError, match="names several devices"):
            artifact._to_named_device(gm)


def _set(path):
    def edit(meta):
        node = meta
        for key in path[:-2]:
            node = node[key]
        node[path[-2]] = path[-1]
    return edit


@pytest.mark.parametrize("edit, said", [
    (_set(("report", "seconds", {})), "Report.seconds is {}, where a save writes float"),
    (_set(("report", "rules", 0, "params_before", None)), "RuleReport.params_before is None, where a save writes int"),
    (_set(("report", "rules", 0, "params_before", "nan")), "RuleReport.params_before is 'nan'"),
    (_set(("report", "rules", 0, "notes", [1])), "RuleReport.notes is [1]"),
    (_set(("report", "earlier", {})), "Report.earlier is {}"),
    (_set(("call", "flags", "use_cache", {"a": 1})), "a call flag's value {'a': 1} is none that a save writes"),
])
def test_a_report_or_flag_of_the_wrong_kind_is_refused_at_load(llama_dir, edit, said):
    """They loaded: printing the model (its report table) then raised a TypeError from the
    formatting, and a flag no save writes was refused only by the next save (bad-input audit)."""
    _edit_meta(llama_dir, edit)
    refused(llama_dir, said, "meta.json was changed or damaged")


def test_every_report_field_has_the_kind_a_save_writes():
    """The load's check reads each field's annotation; a field added without one in the table
    would fail every load as "meta.json was changed or damaged"."""
    import dataclasses

    from slimfx.runtime.report import _FIELD_TYPES, Report, RuleReport

    for cls in (Report, RuleReport):
        assert {f.type for f in dataclasses.fields(cls)} <= set(_FIELD_TYPES), cls
