"""`tokens after <blocks> merge` against a direct ToMe implementation (tome_ref.py) on a tiny BERT
run one sequence at a time; identity at r = 0; the refusals."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import slimfx
from slimfx.models import tiny

from tome_ref import bert_with_token_ops, merge_tokens

MERGE = "tokens unpad\ntokens after blocks[1:3] merge ratio={ratio} protect={protect} restore=true"
# (ratio, protect, by, after `tokens unpad`): without it the tokens are packed from block 1 on.
VARIANTS = [(0.3, "cls", "hidden", True), (0.5, "none", "hidden", True), (0.3, "cls", "keys", True),
            (0.3, "cls", "hidden", False)]


def _rules(ratio, protect, by="hidden", unpad=True) -> str:
    merge = f"tokens after blocks[1:3] merge ratio={ratio} protect={protect} by={by} restore=true"
    return f"tokens unpad\n{merge}" if unpad else merge


def _batch(lengths, seq: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def compiled(bert):
    example = _batch([12, 8, 5], 12, 0)
    return {v: slimfx.compile(bert.model, _rules(*v), example_inputs=example, calib=[example]) for v in VARIANTS}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 14), min_size=1, max_size=3), seed=st.integers(0, 1000),
       variant=st.sampled_from(VARIANTS))
def test_merge_equals_a_direct_tome_run_one_sequence_at_a_time(bert, compiled, lengths, seed, variant):
    """by=keys matches on block i's keys averaged over heads (ToMe's metric), recomputed in the
    test from that block's key projection; without `tokens unpad` the result is the same."""
    ratio, protect, by, _ = variant
    batch = _batch(lengths, max(lengths), seed)
    with torch.no_grad():
        got = compiled[variant](**batch).last_hidden_state
    if by == "keys":
        op = lambda x, s, qk: merge_tokens(x, s, ratio, protect == "cls", metric=qk()[1].mean(0))  # noqa: E731
    else:
        op = lambda x, s, _: merge_tokens(x, s, ratio, protect == "cls")  # noqa: E731
    for row, n in enumerate(lengths):
        want = bert_with_token_ops(bert.model, batch["input_ids"][row, :n], {1: op, 2: op})
        torch.testing.assert_close(got[row, :n], want, atol=1e-5, rtol=1e-4)
        assert got[row, n:].abs().sum() == 0


def test_merging_changes_the_output_and_the_report_counts_tokens(bert, compiled):
    batch = _batch([12, 8, 5], 12, 0)
    with torch.no_grad():
        plain = bert.model(**batch).last_hidden_state
        merged = compiled[VARIANTS[0]](**batch).last_hidden_state
        by_keys = compiled[VARIANTS[2]](**batch).last_hidden_state
    assert (plain - merged).abs().max() > 1e-2  # a merge that did nothing would pass the reference test too
    assert (by_keys - merged).abs().max() > 1e-2  # keys that silently fell back to hidden states
    rule = compiled[VARIANTS[0]].report.rules[1]
    # 25 real tokens; ⌊0.3·L⌋ per sequence: 3+2+1 = 6 after block 1, then 2+1+1 = 4 after block 2.
    assert rule.details["tokens"] == ["25→19", "19→15"]
    assert rule.details["flops_after"] < rule.details["flops_before"]
    assert not any("at most" in n for n in rule.notes)


def test_a_ratio_the_matching_cannot_reach_says_so(bert, compiled):
    """ratio=0.5 with protect=none takes ⌊L/2⌋, all it can; ToMe's cap is said from 0.5 up, since
    with protect=cls it then merges fewer than the ratio asks."""
    rule = compiled[VARIANTS[1]].report.rules[1]
    assert any("at most ⌊L/2⌋" in n and "protect=cls" in n for n in rule.notes), rule.notes


def test_a_ratio_that_merges_nothing_is_bit_identical_to_unpad_alone(bert):
    example = _batch([6, 4], 6, 3)
    alone = slimfx.compile(bert.model, "tokens unpad", example_inputs=example, calib=[example])
    tiny_ratio = slimfx.compile(bert.model, MERGE.format(ratio=0.05, protect="cls"), example_inputs=example,
                                calib=[example])
    with torch.no_grad():
        assert torch.equal(tiny_ratio(**example).last_hidden_state, alone(**example).last_hidden_state)


def test_proportional_attention_changes_merged_attention_only(bert):
    example = _batch([12, 8, 5], 12, 4)
    rules = "tokens unpad\ntokens after blocks[1:3] merge ratio={ratio} prop_attn={prop} restore=true"
    out = {}
    for ratio in (0.3, 0.05):
        for prop in ("true", "false"):
            cm = slimfx.compile(bert.model, rules.format(ratio=ratio, prop=prop), example_inputs=example,
                                calib=[example])
            with torch.no_grad():
                out[ratio, prop] = cm(**example).last_hidden_state
    # With merges the sizes differ from 1 and change attention; with none (⌊0.05·L⌋ = 0) log 1 = 0.
    assert (out[0.3, "true"] - out[0.3, "false"]).abs().max() > 1e-3
    torch.testing.assert_close(out[0.05, "true"], out[0.05, "false"], atol=1e-6, rtol=1e-6)


def test_save_load_keeps_the_merge(bert, compiled, tmp_path):
    cm = compiled[VARIANTS[3]]  # packed by the merge rule itself
    cm.save(tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    batch = _batch([9, 14, 2], 14, 7)
    with torch.no_grad():
        assert torch.equal(back(**batch).last_hidden_state, cm(**batch).last_hidden_state)


@pytest.mark.parametrize("rules,arch,match", [
    ("tokens unpad\ntokens after blocks[3] merge ratio=0.3 restore=true", "bert", "last block"),
    ("tokens unpad\ntokens after blocks[1] merge ratio=0.3 restore=true", "llama", "is causal"),
])
def test_refusals(rules, arch, match):
    lm = tiny(arch, layers=4)
    example = _batch([6, 4], 6, 1)
    with pytest.raises(slimfx.SpecError, match=match):
        slimfx.compile(lm.model, rules, example_inputs=example, calib=[example])
