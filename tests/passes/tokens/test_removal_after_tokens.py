"""A `drop`/`collapse` below a `tokens after` rule: with no `tokens unpad` above, the token rule
packs the stream entering its block, and the pack was the output of the block before it — removing
that block removed the pack, and every call failed (a size mismatch). The pack now packs what
enters the gap. Checked against the direct ToMe run on the model with the block taken out
(tome_ref.py), and against the same removal written above the token rule."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimfx
from slimfx.models import tiny

from test_merge import _batch
from tome_ref import bert_with_token_ops, merge_tokens, vit_with_token_ops

MERGE = "merge ratio=0.3 protect=cls restore=true"


@pytest.mark.parametrize("unpad", [False, True])
@pytest.mark.parametrize("after, removed", [(1, 0), (2, 1), (2, 0)])
def test_a_drop_below_a_merge_equals_tome_on_the_model_without_the_block(bert, after, removed, unpad):
    rules = f"tokens after blocks[{after}] {MERGE}\ndrop blocks[{removed}]"
    example = _batch([12, 8, 5], 12, 0)
    cm = slimfx.compile(bert.model, ("tokens unpad\n" if unpad else "") + rules, example_inputs=example)
    smaller = copy.deepcopy(bert.model)
    smaller.encoder.layer = nn.ModuleList(l for i, l in enumerate(bert.model.encoder.layer) if i != removed)
    op = lambda x, s, _: merge_tokens(x, s, 0.3, True)  # noqa: E731
    batch = _batch([11, 4, 7], 11, 3)  # right padding
    with torch.no_grad():
        got = cm(**batch).last_hidden_state
    for row, n in enumerate([11, 4, 7]):
        want = bert_with_token_ops(smaller, batch["input_ids"][row, :n], {after - (removed < after): op})
        torch.testing.assert_close(got[row, :n], want, atol=1e-5, rtol=1e-4)
        assert got[row, n:].abs().sum() == 0


@pytest.mark.parametrize("arch, below, above", [
    ("bert", "tokens after blocks[2] merge ratio=0.3\ncollapse blocks[0:2]",
     "collapse blocks[0:2]\ntokens after blocks[1] merge ratio=0.3"),
    ("bert", "tokens after blocks[1] prune keep=0.5\ndrop blocks[0]", "drop blocks[0]\ntokens after blocks[0] prune keep=0.5"),
    ("llama", "tokens after blocks[1] prune keep=0.5\ndrop blocks[0]", "drop blocks[0]\ntokens after blocks[0] prune keep=0.5"),
])
def test_a_removal_below_a_token_rule_equals_it_written_above(arch, below, above):
    lm = tiny(arch, layers=4)
    a = slimfx.compile(lm.model, below, example_inputs=lm.example_inputs)
    b = slimfx.compile(lm.model, above, example_inputs=lm.example_inputs)
    batch = _batch([9, 3], 9, 1)
    key = "last_hidden_state" if arch == "bert" else "logits"
    with torch.no_grad():
        torch.testing.assert_close(getattr(a(**batch), key), getattr(b(**batch), key), atol=0, rtol=0)
    assert [r.kind for r in a.report.rules] == [r.kind for r in reversed(b.report.rules)]


@pytest.mark.parametrize("arch, rules, op", [("llama", "tokens after blocks[1] prune keep=0.5\ndrop blocks[1]", "token_prune"),
                                             ("bert", "tokens unpad\ntokens after blocks[1] merge ratio=0.3\ndrop blocks[1]",
                                              "token_merge")])
def test_removing_the_block_of_a_token_step_names_the_step(arch, rules, op):
    """It was refused as a value 'e.g. T5's position bias' that later blocks read."""
    lm = tiny(arch, layers=4)
    with pytest.raises(slimfx.SpecError, match=r"(?s)layers?\.1 is where line \d's `tokens after blocks\[1\] [^`]*` prunes "
                                               r"or merges the tokens.*in a rule above the `tokens` rule"):
        slimfx.compile(lm, rules)
    cm = slimfx.compile(lm, rules.rpartition("\n")[0])  # the step compiled in: the graph names its op
    with pytest.raises(slimfx.SpecError, match=rf"(?s)layers?\.1 is where a `tokens after` rule above prunes or "
                                               rf"merges the tokens \(slimfx\.{op}\).*in a rule above the `tokens` rule"):
        slimfx.compile(cm, "drop blocks[1]")


@pytest.mark.parametrize("merge", [False, True])
def test_dropping_the_last_block_below_unpad_equals_the_model_without_it(bert, merge):
    """The output's unpack of the last block's stream was counted as part of that block, so the
    stream itself read "after" it (by the pooler) and the drop was refused as if a later block
    needed it."""
    rules = "tokens unpad\n" + (f"tokens after blocks[1] {MERGE}\n" if merge else "") + "drop blocks[3]"
    example = _batch([12, 8, 5], 12, 0)
    cm = slimfx.compile(bert.model, rules, example_inputs=example)
    smaller = copy.deepcopy(bert.model)
    smaller.encoder.layer = nn.ModuleList(list(bert.model.encoder.layer)[:3])
    op = lambda x, s, _: merge_tokens(x, s, 0.3, True)  # noqa: E731
    batch = _batch([11, 4, 7], 11, 3)
    with torch.no_grad():
        got = cm(**batch)
    for row, n in enumerate([11, 4, 7]):
        want = bert_with_token_ops(smaller, batch["input_ids"][row, :n], {1: op} if merge else {})
        torch.testing.assert_close(got.last_hidden_state[row, :n], want, atol=1e-5, rtol=1e-4)
        assert got.last_hidden_state[row, n:].abs().sum() == 0
        # the pooler reads the first position of the new last block's output
        torch.testing.assert_close(got.pooler_output[row], smaller.pooler(want[None])[0], atol=1e-5, rtol=1e-4)


def test_collapsing_into_the_last_blocks_below_unpad_equals_it_without_unpad(bert):
    example = _batch([12, 8, 5], 12, 0)
    packed = slimfx.compile(bert.model, "tokens unpad\ncollapse blocks[2:4]", example_inputs=example)
    padded = slimfx.compile(bert.model, "collapse blocks[2:4]", example_inputs=example)
    batch = _batch([11, 4, 7], 11, 3)
    with torch.no_grad():
        got, want = packed(**batch).last_hidden_state, padded(**batch).last_hidden_state
    for row, n in enumerate([11, 4, 7]):
        torch.testing.assert_close(got[row, :n], want[row, :n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rules", ["tokens after blocks[2] merge ratio=0.3\ndrop blocks[3]",
                                   # after an auto drop: plan's stand-in has as many blocks (it said ready)
                                   "drop blocks auto(count=1)\ntokens after blocks[1] merge ratio=0.3\ndrop blocks[2]",
                                   "tokens after blocks[1] prune keep=0.5 score=norm\ndrop blocks[2:4]",
                                   "tokens after blocks[1] merge ratio=0.3\ndrop blocks[3]\ndrop blocks[2]"])
def test_a_drop_that_leaves_a_token_step_after_the_last_block_is_refused_by_plan_and_compile(rules):
    """Written above the drop, the step was kept after what became the last block (compiled,
    1.66 off the plain drop), where `tokens after <last block>` itself is refused."""
    lm = tiny("bert", layers=4)
    for run in (slimfx.plan, slimfx.compile):
        with pytest.raises(slimfx.SpecError, match=r"(?s)`drop` removes every block after encoder\.layer\.\d, where line "
                                                    r"\d's `tokens after.*a step after the last block saves no work"):
            run(lm, rules)
    assert slimfx.plan(lm, "tokens after blocks[1] merge ratio=0.3\ndrop blocks[3]")  # a block after it stays


def test_dropping_the_blocks_after_a_compiled_token_step_is_refused():
    """compile(cm, "drop …") on a model whose token step is in its graph already."""
    lm = tiny("bert", layers=4)
    cm = slimfx.compile(lm, "tokens after blocks[1] prune keep=0.5 score=norm")
    with pytest.raises(slimfx.SpecError, match=r"removing encoder\.layer\.2, encoder\.layer\.3 leaves encoder\.layer\.1 "
                                                r"the last block, with the `tokens after` step \(slimfx\.token_prune\)"):
        slimfx.compile(cm, "drop blocks[2:4]")
    assert slimfx.compile(cm, "drop blocks[3]")


def test_an_auto_drop_on_a_model_compiled_with_a_token_step_is_refused_by_plan_and_compile():
    """Its scores compare each block's stream in and out on the same tokens: a raw "size of tensor a
    (16) must match the size of tensor b (12)" from the search (in one policy, the language's order
    check says so already)."""
    lm = tiny("bert", layers=5)
    cm = slimfx.compile(lm, "tokens after blocks[1] merge ratio=0.3")
    for run in (slimfx.plan, lambda m, p: slimfx.compile(m, p, calib=[lm.example_inputs])):
        with pytest.raises(slimfx.SpecError, match=r"(?s)`drop … auto` scores each block by the residual stream.*"
                                                    r"the model's `tokens after` step \(slimfx\.token_merge\) changes"):
            run(cm, "drop blocks auto(count=2)")


@pytest.mark.parametrize("compiled_first", [False, True])
def test_dropping_the_block_before_a_vit_merge_equals_tome_on_the_vit_without_it(compiled_first):
    """A ViT has no mask: the pack at block 0's output reads its token count from the stream it
    packs, so that stream counted as a value made in block 0 and read after it — refused as 'e.g.
    T5's position bias' (in one policy and on a compiled model alike)."""
    vit = tiny("vit", layers=4)
    images = {"pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    merge = "tokens after blocks[1] merge ratio=0.3 protect=cls restore=true"
    if compiled_first:
        cm = slimfx.compile(slimfx.compile(vit.model, merge, example_inputs=images), "drop blocks[0]")
    else:
        cm = slimfx.compile(vit.model, f"{merge}\ndrop blocks[0]", example_inputs=images)
    smaller = copy.deepcopy(vit.model)
    smaller.vit.layers = nn.ModuleList(list(vit.model.vit.layers)[1:])
    op = lambda x, s, _: merge_tokens(x, s, 0.3, True)  # noqa: E731
    batch = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        got = cm(**batch).logits
    for row in range(2):
        want = vit_with_token_ops(smaller, batch["pixel_values"][row], {0: op})
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rules, block", [("tokens after blocks[2] merge ratio=0.3\ndrop blocks[2]", 2),
                                          ("tokens after blocks[2] prune keep=0.5\ndrop blocks[2]", 2),
                                          ("tokens after blocks[2] merge ratio=0.3\ncollapse blocks[1:3]", 2),
                                          ("tokens after blocks[1:3] merge ratio=0.3\ndrop blocks[2]", 2)])
def test_removing_the_block_of_a_token_step_in_the_same_policy_is_refused_by_plan_too(rules, block):
    """Plan said ready: the captured graph has no step yet for the removal check to see."""
    lm = tiny("bert", layers=6)
    for run in (slimfx.plan, slimfx.compile):
        with pytest.raises(slimfx.SpecError, match=rf"encoder\.layer\.{block} is where line 1's `tokens after .*` prunes "
                                                    r"or merges the tokens: removing it would take that step away"):
            run(lm, rules)
    assert slimfx.plan(lm, "tokens after blocks[2] merge ratio=0.3\ndrop blocks[1]")
