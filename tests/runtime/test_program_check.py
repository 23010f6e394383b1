"""runtime/program_check.py: load() resolves operators only from aten/prims/slimfx, and of
those refuses the ones that reach past tensors (a file name, a storage, free text); the option
words real graphs pass (gelu's approximate, div's rounding_mode, conv's padding) stay allowed;
save() refuses what load() would."""
from __future__ import annotations

import pytest

from runtime_tiny import refused
from test_artifact import _nodes, _tamper_program


def test_refuses_operators_that_reach_files(llama_dir, tmp_path):
    """Allowed namespaces are not enough: aten.from_file(shared=True) then fill_ would overwrite
    any file the user can write when the loaded model runs."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me " * 4)

    def edit(doc):
        out = _nodes(doc).pop()
        _nodes(doc).extend([
            {"op": "call_function", "name": "evil_map", "target": "aten.from_file.default",
             "args": [str(victim)],
             "kwargs": {"shared": True, "size": 16, "dtype": {"dtype": "uint8"}}},
            {"op": "call_function", "name": "evil_fill", "target": "aten.fill_.Scalar",
             "args": [{"node": "evil_map"}, 88], "kwargs": {}},
            out])
    _tamper_program(llama_dir, edit)
    refused(llama_dir, "operator 'aten.from_file.default' takes a free string (filename",
            "never runs code")
    assert victim.read_bytes() == b"keep me " * 4


@pytest.mark.parametrize("target", ["aten.save.default", "aten._print.default",
                                    "aten.set_.source_Storage"])
def test_refuses_file_text_and_storage_operators(target):
    from slimfx.runtime.program_check import resolve_target
    from slimfx.runtime.artifact_errors import ArtifactError
    with pytest.raises(ArtifactError, match="a model's graph never does"):
        resolve_target(target)


@pytest.mark.parametrize("target", ["aten.gelu.default", "aten.div.Tensor_mode",
                                    "aten._assert_scalar.default", "aten.convolution.default",
                                    "aten.einsum.default", "aten.pad.default"])
def test_operators_with_option_words_stay_allowed(target):
    from slimfx.runtime.program_check import resolve_target
    from slimfx.runtime.program_check import op_name
    assert op_name(resolve_target(target)) == target


def test_save_refuses_an_operator_load_would_refuse():
    """linalg.cond with p='fro' takes a string load() does not know as an option word: the model
    saved, and its artifact was refused at load."""
    import torch
    from torch import fx

    from slimfx.runtime.artifact_errors import ArtifactError
    from slimfx.runtime.graph_io import encode_graph
    from slimfx.runtime.program_check import resolve_target

    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.linalg_cond.p_str, (x, "fro")))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(ArtifactError, match=r"cannot save the model: node linalg_cond_p_str calls "
                                            r"aten.linalg_cond.p_str, which takes a free string \(p"):
        encode_graph(gm, "the model")
    with pytest.raises(ArtifactError, match="a model's graph never does"):
        resolve_target("aten.linalg_cond.p_str")
