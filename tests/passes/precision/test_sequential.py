"""Sequential GPTQ (passes/precision/sequential.py) against a direct block-by-block loop written
here on the Hugging Face model itself: block i's Hessians from the model whose blocks 0..i-1
already hold their dequantized GPTQ weights. Shared inputs accumulate once; bad input refused."""
from __future__ import annotations

import copy

import pytest
import torch

import slimfx
from slimfx.models import tiny
from slimfx.passes.precision.gptq import HessianAccumulator, gptq
from slimfx.runtime.formats import QuantFormat, dequantize, unpack

from passes_tiny import assert_same_codes, token_batches

FMT = QuantFormat(4, 16, True)
POLICY = "quantize blocks.*.** : Linear int4 group=16 method=gptq"


def _calib(n=3, rows=2, length=12, seed=0):
    return token_batches(n, rows, length, seed)


BLOCK = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj"),)
LAYERS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _direct_sequential(model, calib, groups=BLOCK, layers="model.layers"):
    """Group by group of each block on the HF model (BLOCK: the whole block at once; LAYERS:
    true-sequential): hooks gather each linear's inputs on the model as it is at that moment,
    GPTQ, then the group's weights become their dequantized codes before the next group."""
    model = copy.deepcopy(model).eval()
    codes = {}
    for i, layer in enumerate(model.get_submodule(layers)):
        for group in groups:
            linears = {n: layer.get_submodule(n) for n in group}
            accs = {n: HessianAccumulator() for n in linears}
            hooks = [m.register_forward_hook(lambda mod, args, out, n=n: accs[n].add(args[0]))
                     for n, m in linears.items()]
            with torch.no_grad():
                for batch in calib:
                    model(**batch)
            for h in hooks:
                h.remove()
            for n, m in linears.items():
                qw = gptq(m.weight.detach(), accs[n].H, FMT)
                codes[f"{layers}.{i}.{n}"] = unpack(qw.qweight, 4, m.in_features)
                m.weight.data.copy_(dequantize(qw))
    return model, codes


def test_sequential_gptq_equals_a_direct_block_by_block_loop():
    lm = tiny("llama", layers=3)
    calib = _calib()
    cm = slimfx.compile(lm.model, POLICY, example_inputs=lm.example_inputs, calib=calib, backend="eager")
    direct, codes = _direct_sequential(lm.model, calib)
    assert len(codes) == 3 * 7  # every linear of every block
    assert_same_codes(cm, codes, 4)
    state = cm.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(cm(**lm.example_inputs).logits, direct(**lm.example_inputs).logits,
                                   atol=1e-3, rtol=1e-3)
    # Calibrating every block on the uncompressed model (sequential=false) is a different result.
    flat = slimfx.compile(lm.model, POLICY + " sequential=false", example_inputs=lm.example_inputs,
                          calib=calib, backend="eager")
    later = "program.model.layers.2.mlp.down_proj.qweight"
    assert not torch.equal(flat.state_dict()[later], state[later])
    assert cm.report.rules[0].details["sequential"] is True


# A post-norm encoder: the first linears of block i > 0 read block i−1's last value (its output
# LayerNorm), which the sweep computed before it reached block i; those Hessians saw no row and
# compile raised "no calibration rows were added" until the stream handed held values over too.
BERT_BLOCK = (("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense"),)
BERT_LAYERS = (("attention.self.query", "attention.self.key", "attention.self.value"), ("attention.output.dense",),
               ("intermediate.dense",), ("output.dense",))


@pytest.mark.parametrize("groups, extra", [(BERT_BLOCK, ""), (BERT_LAYERS, " true_sequential=true")])
def test_sequential_gptq_on_a_post_norm_encoder_equals_a_direct_loop(groups, extra):
    lm = tiny("bert", layers=3)
    calib = _calib()
    cm = slimfx.compile(lm.model, POLICY + extra, example_inputs=lm.example_inputs, calib=calib, backend="eager")
    direct, codes = _direct_sequential(lm.model, calib, groups, layers="encoder.layer")
    assert len(codes) == 3 * 6
    assert_same_codes(cm, codes, 4)
    with torch.no_grad():
        torch.testing.assert_close(cm(**lm.example_inputs).last_hidden_state,
                                   direct(**lm.example_inputs).last_hidden_state, atol=1e-3, rtol=1e-3)


def test_inputs_shared_by_several_targets_are_accumulated_once(monkeypatch):
    calls = []
    original = HessianAccumulator.add
    monkeypatch.setattr(HessianAccumulator, "add", lambda self, x: (calls.append(x.shape), original(self, x)))
    lm = tiny("llama", layers=2)
    slimfx.compile(lm.model, POLICY, example_inputs=lm.example_inputs, calib=_calib(n=2), backend="eager")
    # Per block: the attention input (q, k, v), o's input, the MLP input (gate, up), down's input.
    assert len(calls) == 2 * 4 * 2  # blocks × distinct inputs × batches


def test_sequential_gptq_needs_calibration():
    lm = tiny("llama")
    # "and none were given" said the user who passed calib=[] had passed nothing
    with pytest.raises(slimfx.SpecError, match=r"GPTQ needs calibration inputs, and there are no calibration batches \(calib= is empty"):
        slimfx.compile(lm.model, POLICY, example_inputs=lm.example_inputs, calib=[], backend="eager")


def test_padding_stays_out_of_the_sequential_hessians():
    # A right-padded batch against the same real tokens without padding (causal: a real token
    # never sees the padding after it): the same codes, give or take a rounding flip.
    lm = tiny("llama", layers=2)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    padded = [{"input_ids": ids, "attention_mask": mask}]
    trimmed = [{"input_ids": ids[:1, :8], "attention_mask": mask[:1, :8]},
               {"input_ids": ids[1:], "attention_mask": mask[1:]}]
    a, b = (slimfx.compile(lm.model, POLICY, example_inputs=lm.example_inputs, calib=c, backend="eager")
            for c in (padded, trimmed))
    assert a.report.rules[0].details["calib_tokens"] == b.report.rules[0].details["calib_tokens"] == 20
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.endswith(".qweight")]
    same = sum(int((sa[k] == sb[k]).sum()) for k in keys)
    assert same / sum(sa[k].numel() for k in keys) >= 0.999


def test_true_sequential_equals_a_direct_layer_by_layer_loop():
    lm = tiny("llama", layers=2)
    calib = _calib()
    cm = slimfx.compile(lm.model, POLICY + " true_sequential=true", example_inputs=lm.example_inputs, calib=calib,
                        backend="eager")
    direct, codes = _direct_sequential(lm.model, calib, LAYERS)
    assert_same_codes(cm, codes, 4)
    state = cm.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(cm(**lm.example_inputs).logits, direct(**lm.example_inputs).logits,
                                   atol=1e-3, rtol=1e-3)
    # Block by block only (o calibrated on the float q/k/v's attention) gives other codes for o.
    block = slimfx.compile(lm.model, POLICY, example_inputs=lm.example_inputs, calib=calib, backend="eager")
    o = "program.model.layers.0.self_attn.o_proj.qweight"
    assert not torch.equal(block.state_dict()[o], state[o])
    assert cm.report.rules[0].details["sequential"] == "by layer"


def test_true_sequential_needs_gptq_block_by_block():
    for rule in ("quantize blocks.*.** : Linear int4 true_sequential=true",
                 "quantize blocks.*.** : Linear int4 method=gptq sequential=false true_sequential=true"):
        with pytest.raises(slimfx.SpecError) as e:
            slimfx.parse("policy p {\n" + rule + "\n}")
        assert e.value.kind == "invalid-combination"
