"""`x @ W.T` over a module's weight (Falcon's FalconLinear) is captured as `aten.linear`, so every
pass finds it: quantize and adapt ended in a PassError ("no linear over its weight found among its
nodes (aten.matmul.default, aten.numpy_T.default)") that `plan` had not foreseen."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import slimfx
from slimfx.passes.capture import capture
from slimfx.runtime.formats import QuantFormat, dequantize, quantize_rtn

aten = torch.ops.aten


@pytest.fixture(scope="module")
def falcon():
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                    alibi=False, bias=True)
    return transformers.FalconForCausalLM(cfg).eval()


def _batch(seed: int = 0) -> dict:
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_falcon_linears_are_captured_as_linear_and_unchanged(falcon):
    graph = capture(falcon, _batch())
    block_linears = [p for p, m in falcon.named_modules() if p.startswith("transformer.h.")
                     and isinstance(m, torch.nn.Linear)]
    for path in block_linears:
        assert [n.target for n in graph.targets[path].nodes if n.target is aten.linear.default], path
    batch = _batch(1)
    with torch.no_grad():
        assert torch.equal(graph(**batch).logits, falcon(**batch).logits)


def test_falcon_quantizes_as_its_weights_rounded(falcon):
    batch = _batch(2)
    cm = slimfx.compile(falcon, "quantize blocks.*.** : Linear int8", example_inputs=batch)
    cm.set_backend("eager")
    ref = copy.deepcopy(falcon)
    paths = cm.report.rules[0].targets
    assert len(paths) == 8
    with torch.no_grad():
        for path in paths:
            w = ref.get_submodule(path).weight
            w.copy_(dequantize(quantize_rtn(w, QuantFormat(8))))
        torch.testing.assert_close(cm(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=1e-5)
        assert not torch.equal(cm(**batch).logits, falcon(**batch).logits)
    assert cm.report.rules[0].bytes_after < cm.report.rules[0].bytes_before / 3  # the fp32 weights left


def test_falcon_takes_adapters_as_peft_does(falcon):
    peft = pytest.importorskip("peft")
    from peft_twin import peft_twin

    cm = slimfx.compile(falcon, "adapt blocks.*.attn.qkv lora rank=4 alpha=8", example_inputs=_batch())
    with torch.no_grad():
        for p in cm.adapter_parameters():
            p.normal_(0, 0.1)
    twin = peft_twin(peft, falcon, cm, rank=4, alpha=8, targets=["query_key_value"], dora=False)
    x = _batch(3)
    with torch.no_grad():
        got, want = cm(**x).logits, twin(**x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (want - falcon(**x).logits).abs().max() > 1e-3
