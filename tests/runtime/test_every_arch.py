"""Every tiny architecture end to end: CompiledModel == original model, then save -> load ==
CompiledModel, bit for bit, at the example shape and at another batch/sequence length.

One test per architecture so that each is captured, saved and loaded once per worker."""
from __future__ import annotations

import torch

from runtime_tiny import assert_identical, compiled, eager, leaves, other_inputs
from slimfx.passes.graph import ModelGraph
from slimfx.runtime.artifact import FILES, load


def test_compile_save_load(arch, saved):
    case = compiled(arch)
    lm = case.loaded
    shapes = (lm.example_inputs, other_inputs(lm), other_inputs(lm, batch=1, seq=5))
    for inputs in shapes:
        assert_identical(case.cm(**inputs), eager(case.loaded, inputs), f"{arch} compiled")

    path = saved(arch)
    assert sorted(p.name for p in path.iterdir()) == sorted(FILES)
    back = load(path)
    for inputs in shapes:
        assert_identical(back(**inputs), case.cm(**inputs), f"{arch} loaded")

    # The runtime loads a Program with no compiler index; the passes can index it again, and the
    # loaded graph keeps every invariant they rely on.
    indexed = ModelGraph.of(back.graph)
    indexed.lint()
    assert [b.path for b in indexed.blocks] == [b.path for b in case.cm.graph.blocks]
    assert list(indexed.targets) == list(case.cm.graph.targets)
    assert indexed.dim_symbols("seq") or "pixel_values" in back.input_names
    assert back.report == case.cm.report
    assert (back.policy_name, back.policy_text) == (case.cm.policy_name, case.cm.policy_text)
    assert back.weight_bytes() == case.cm.weight_bytes()
    assert _param_names(back) == _param_names(case.cm)
    assert all(isinstance(p, torch.nn.Parameter) for p in back.parameters())
    assert not back.training and len(leaves(back(**shapes[0]))) >= 1


def _param_names(cm) -> list[str]:
    # remove_duplicate=True: a tied weight (gpt2's lm_head) is listed once in both or neither.
    return [n for n, _ in cm.named_parameters()]
