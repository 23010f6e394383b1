"""A compiled graph names the device it was captured on (aten.arange(device=…), export's
dtype/device checks). An artifact compiled on a device this machine lacks is refused at load (it
loaded, then every call failed inside the generated code); one compiled on another device that
is here gets its weights there (they came off the file on the CPU, beside a graph that makes its
tensors on the GPU); a compiled model refuses to move to a device its graph does not name,
saying to compile the original there. The GPU side runs in benchmarks/gpu_check.sh."""
from __future__ import annotations

import torch
import pytest
from torch import nn

import slimfx
from runtime_tiny import compiled, refused, rehash
from slimfx.runtime.program import devices_named


def _rename_device(path, old: str, new: str) -> None:
    program = path / "program.json"
    text = program.read_text()
    assert f'"{old}"' in text
    program.write_text(text.replace(f'"{old}"', f'"{new}"'))
    rehash(path)


def test_the_graph_names_the_device_it_was_captured_on():
    assert devices_named(compiled("llama").cm.program) == {torch.device("cpu")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_artifact_compiled_for_a_device_this_machine_lacks_is_refused_at_load(llama_dir):
    _rename_device(llama_dir, "cpu", "cuda:0")
    message = refused(llama_dir, "compiled for cuda:0", "which this machine does not have",
                      "load it on a machine with cuda", "compile the original model")
    assert "damaged" not in message


def test_the_weights_go_to_the_device_the_graph_names(llama_dir):
    """'meta' stands in for a GPU here: a device every machine has, other than the CPU."""
    _rename_device(llama_dir, "cpu", "meta")
    cm = slimfx.load(llama_dir, backend="eager")
    assert {t.device.type for t in cm.state_dict().values()} == {"meta"}


def test_a_move_to_a_device_the_graph_does_not_name_is_refused_before_anything_moves():
    case = compiled("llama")
    cm = case.cm
    before = {k: v.device for k, v in cm.state_dict().items()}
    for move in (lambda: cm.to("meta"), lambda: nn.Sequential(cm).to("meta"), lambda: cm.to("meta", torch.float32)):
        # not "move the original model there and compile that": compile refuses a model on meta
        with pytest.raises(RuntimeError, match=r"was compiled on cpu.*cannot move to meta \(to free its memory, delete it\)$"):
            move()
    assert {k: v.device for k, v in cm.state_dict().items()} == before
    cm.to("cpu")  # its own device: no change, no refusal
    torch.testing.assert_close(cm(**case.loaded.example_inputs).logits,
                               case.loaded.model(**case.loaded.example_inputs).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs this there)")
def test_an_artifact_compiled_on_a_gpu_loads_there_with_its_weights_on_it_on_a_gpu(tmp_path):
    from slimfx.models import tiny

    loaded = tiny("llama")
    model = loaded.model.to("cuda")
    inputs = {k: v.to("cuda") for k, v in loaded.example_inputs.items()}
    cm = slimfx.compile(model, "quantize blocks.*.mlp.* int8", example_inputs=inputs, backend="eager")
    cm.save(tmp_path / "gpu")
    back = slimfx.load(tmp_path / "gpu", backend="eager")
    assert {t.device.type for t in back.state_dict().values()} == {"cuda"}
    assert torch.equal(back(**inputs).logits, cm(**inputs).logits)
    with pytest.raises(RuntimeError, match="was compiled on cuda"):
        back.to("cpu")
