"""Models whose first block is built unlike the rest: T5's alone holds the relative position table
(every later block adds the bias it computes), ModernBERT's first layer has an Identity for its
attention norm. They had no blocks at all ("no repeated blocks"): every block rule was refused.
Checked against the Hugging Face model with the same layer deleted."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import slimfx
from slimfx.dsl.errors import SpecError


def _t5():
    cfg = transformers.T5Config(vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                                feed_forward_proj="gated-gelu")
    return transformers.T5EncoderModel(cfg).eval(), "encoder.block"


def _modernbert():
    cfg = transformers.ModernBertConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, max_position_embeddings=64, global_attn_every_n_layers=1,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return transformers.ModernBertModel(cfg).eval(), "layers"


MODELS = {"t5": _t5, "modernbert": _modernbert}


def _batch(seed: int = 0) -> dict:
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _without(model, container: str, k: int):
    ref = copy.deepcopy(model)
    owner, _, name = container.rpartition(".")
    parent = ref.get_submodule(owner) if owner else ref
    setattr(parent, name, torch.nn.ModuleList([b for i, b in enumerate(getattr(parent, name)) if i != k]))
    return ref


@pytest.mark.parametrize("name", list(MODELS))
def test_a_block_is_dropped_as_deleting_the_layer_does(name):
    torch.manual_seed(0)
    model, container = MODELS[name]()
    cm = slimfx.compile(model, "drop blocks[1]", example_inputs=_batch())
    batch = _batch(1)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        got, want = cm(**batch).last_hidden_state, _without(model, container, 1)(**batch).last_hidden_state
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert cm.report.rules[0].targets == (f"{container}.1",)


@pytest.mark.parametrize("name, roles", [
    ("t5", {"layer.0.SelfAttention.q": "attn.q", "layer.0.SelfAttention.o": "attn.o",
            "layer.1.DenseReluDense.wi_0": "mlp.gate", "layer.1.DenseReluDense.wi_1": "mlp.up",
            "layer.1.DenseReluDense.wo": "mlp.down"}),
    ("modernbert", {"attn.Wqkv": "attn.qkv", "attn.Wo": "attn.o", "mlp.Wi": "mlp.gate_up", "mlp.Wo": "mlp.down"}),
])
def test_their_linears_have_roles(name, roles):
    torch.manual_seed(0)
    model, container = MODELS[name]()
    plan = slimfx.plan(model, "quantize blocks.*.** : Linear int8", example_inputs=_batch())
    got = {t.path: t.role for t in plan.rules[0].targets if t.block == 0}
    assert {f"{container}.0.{p}": r for p, r in roles.items()}.items() <= got.items()


def test_t5s_first_block_is_refused_and_never_picked_by_a_search():
    torch.manual_seed(0)
    model, _ = _t5()
    for run in (slimfx.plan, slimfx.compile):  # plan said "ready"
        with pytest.raises(SpecError) as e:
            run(model, "drop blocks[0]", example_inputs=_batch())
        assert e.value.kind == "unsupported" and "encoder.block.0 computes a value the blocks after it read" in e.value.message
    # An auto search on only blocks 0 and 1: block 0 is no candidate, so block 1 goes.
    calib = [_batch(s) for s in range(2)]
    cm = slimfx.compile(model, "drop blocks[0:2] auto(count=1)", example_inputs=_batch(), calib=calib)
    assert cm.report.rules[0].targets == ("encoder.block.1",)


def test_t5s_first_block_is_refused_for_its_position_bias_even_where_a_token_rule_prunes():
    """The first block's refusal names the position bias, whose fix is another block, not the token
    step (moving the drop above the token rule cannot help there); a later block's is the step's."""
    torch.manual_seed(0)
    model, _ = _t5()
    with pytest.raises(SpecError, match="encoder.block.0 computes a value the blocks after it read") as e:
        slimfx.compile(model, "tokens after blocks[0] prune keep=0.5\ndrop blocks[0]", example_inputs=_batch())
    assert len(e.value.diagnostics) == 1  # not also "remove it in a rule above the `tokens` rule"
    with pytest.raises(SpecError, match=r"encoder.block.1 is where line 1's `tokens after blocks\[1\] prune keep=0.5` "
                                        r"prunes"):
        slimfx.compile(model, "tokens after blocks[1] prune keep=0.5\ndrop blocks[1]", example_inputs=_batch())


@pytest.mark.parametrize("name, odd", [("t5", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight "
                                               "has no counterpart in encoder.block.1"),
                                       ("modernbert", "layers.1.attn_norm.weight has no counterpart in layers.0")])
def test_merging_into_a_first_block_built_otherwise_is_refused_and_never_tried_by_a_search(name, odd):
    """plan said "ready": T5's compile raised a raw PassError, and ModernBERT's merge left out the
    second layer's attention norm silently. A search skips such a run, and the blocks after the
    first still merge (checked against LaCo's formula done by hand)."""
    torch.manual_seed(0)
    model, container = MODELS[name]()
    for run in (slimfx.plan, slimfx.compile):
        with pytest.raises(SpecError) as e:
            run(model, "collapse blocks[0:2]", example_inputs=_batch())
        assert e.value.kind == "unsupported" and odd in e.value.message
    calib = [_batch(s) for s in range(2)]
    cm = slimfx.compile(model, "collapse blocks[0:3] auto(count=1, span=2, threshold=0.01)", example_inputs=_batch(),
                        calib=calib)
    assert [(t["into"], t["merged"], t["accepted"]) for t in cm.report.rules[0].details["trials"]] == [
        (f"{container}.1", (f"{container}.2",), True)]
    if name == "modernbert":  # block 0 is no LaCo candidate of T5's: a removal there is refused first
        only_first = slimfx.compile(model, "collapse blocks[0:2] auto(count=1, span=2, threshold=0.01)",
                                    example_inputs=_batch(), calib=calib).report.rules[0]
        assert only_first.details["trials"] == [] and only_first.targets == ()
    ref = _without(model, container, 2)
    with torch.no_grad():
        layers = ref.get_submodule(container)
        original = dict(model.get_submodule(container)[2].named_parameters())
        for n, p in layers[1].named_parameters():
            p.add_(original[n] - p)
    batch = _batch(1)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(cm(**batch).last_hidden_state[real], ref(**batch).last_hidden_state[real],
                                   atol=1e-5, rtol=1e-5)
