"""meta.json against the program at load (no hash covers meta.json): an edited output count or a
stray declared flag loaded without a word, then every call failed with a raw IndexError or
KeyError; and a required entry of the wrong kind."""
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
