"""`tokens after <block> prune score=norm restore=true` against a direct implementation (tome_ref.py)
on a tiny BERT, one sequence at a time; keep=1.0 is the identity; decoders keep their last position."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import slimfx
from slimfx.models import DECODER_ARCHS, TINY_ARCHS, tiny

from tome_ref import bert_with_token_ops, cls_attention, merge_tokens, prune_tokens

PRUNE = "tokens unpad\ntokens after blocks[{block}] prune keep={keep} score=norm protect={protect} restore=true"


def _batch(lengths, seq: int, seed: int, left: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, seq - n:] = 1
        else:
            mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def bert():
    """A tiny BERT whose block outputs have distinct norms: BERT is post-norm, and with a fresh
    LayerNorm (weight 1, bias 0) every token leaves a block with norm √d, so a norm ranking would
    be decided by rounding. Random LayerNorm weights make the ranking well-defined."""
    lm = tiny("bert", layers=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lm.model.encoder.layer:
            norm = layer.output.LayerNorm
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=gen))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=gen))
    return lm


@pytest.fixture(scope="module")
def pruned(bert):
    example = _batch([12, 8, 5], 12, 0)
    rules = PRUNE.format(block=1, keep=0.6, protect="cls") + "\ntokens after blocks[2] merge ratio=0.3 restore=true"
    return slimfx.compile(bert.model, rules, example_inputs=example, calib=[example])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 14), min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_prune_then_merge_equals_a_direct_run_one_sequence_at_a_time(bert, pruned, lengths, seed):
    batch = _batch(lengths, max(lengths), seed)
    with torch.no_grad():
        got = pruned(**batch).last_hidden_state
    ops = {1: lambda x, s, _: prune_tokens(x, s, 0.6, True), 2: lambda x, s, _: merge_tokens(x, s, 0.3, False)}
    for row, n in enumerate(lengths):
        want = bert_with_token_ops(bert.model, batch["input_ids"][row, :n], ops)
        torch.testing.assert_close(got[row, :n], want, atol=1e-5, rtol=1e-4)


def test_pruning_changes_the_output_and_counts_tokens(bert, pruned):
    batch = _batch([12, 8, 5], 12, 0)
    with torch.no_grad():
        assert (bert.model(**batch).last_hidden_state - pruned(**batch).last_hidden_state).abs().max() > 1e-2
    # ⌈0.6·L⌉ of 12, 8, 5 = 8 + 5 + 3 = 16 of 25; then the merge takes ⌊0.3·L⌋ = 2 + 1 + 0.
    assert pruned.report.rules[1].details["tokens"] == ["25→16"]
    assert pruned.report.rules[2].details["tokens"] == ["16→13"]


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "vit"])  # vit: test_vit.py
def test_keep_all_is_bit_identical_to_unpad_alone(arch):
    """On every tiny architecture with a token sequence. gemma2 writes its attention out by hand
    (transformers has no sdpa path for it), which stays padded: a token rule is refused there."""
    lm = tiny(arch, layers=3)
    decoder = arch in DECODER_ARCHS
    example = _batch([7, 4, 6], 7, 2, left=decoder)
    rules = PRUNE.format(block=1, keep=1.0, protect="none")
    if arch == "gemma2":
        with pytest.raises(slimfx.SpecError, match="needs an attention that runs per sequence after"):
            slimfx.compile(lm.model, rules, example_inputs=example, calib=[example])
        return
    alone = slimfx.compile(lm.model, "tokens unpad", example_inputs=example, calib=[example])
    kept = slimfx.compile(lm.model, rules, example_inputs=example, calib=[example])
    with torch.no_grad():
        a, b = alone(**example), kept(**example)
    first = a.logits if decoder else a.last_hidden_state
    second = b.logits if decoder else b.last_hidden_state
    assert torch.equal(first, second)


def test_a_decoder_keeps_its_last_position_and_prefill_shape():
    lm = tiny("llama", layers=3)
    example = _batch([7, 4, 6], 7, 3, left=True)
    cm = slimfx.compile(lm.model, PRUNE.format(block=0, keep=0.2, protect="none"), example_inputs=example,
                        calib=[example])
    with torch.no_grad():
        logits = cm(**example).logits
        want = lm.model(**example).logits
    assert logits.shape == want.shape
    # ⌈0.2·L⌉ of 7, 4, 6 real tokens = 2 + 1 + 2 survive block 0; the last position is always one
    # of them (op-level: test_token_ops.py), so prefill's next-token logits stay its own.
    assert cm.report.rules[1].details["tokens"] == ["17→5"]
    assert torch.isfinite(logits[:, -1]).all()


@pytest.fixture(scope="module")
def by_attention(bert):
    example = _batch([12, 8, 5], 12, 0)
    rules = "tokens unpad\ntokens after blocks[1] prune keep=0.5 score=attention protect=cls restore=true"
    return slimfx.compile(bert.model, rules, example_inputs=example, calib=[example])


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(2, 14), min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_attention_score_equals_the_cls_attention_of_a_direct_run(bert, by_attention, lengths, seed):
    """score=attention on an encoder: rank by the attention the first token pays each token in
    block 1, recomputed in the test from that block's own query and key projections."""
    batch = _batch(lengths, max(lengths), seed)
    with torch.no_grad():
        got = by_attention(**batch).last_hidden_state
    ops = {1: lambda x, s, qk: prune_tokens(x, s, 0.5, True, score=cls_attention(*qk()))}
    for row, n in enumerate(lengths):
        want = bert_with_token_ops(bert.model, batch["input_ids"][row, :n], ops)
        torch.testing.assert_close(got[row, :n], want, atol=1e-5, rtol=1e-4)


def test_attention_and_norm_scores_keep_different_tokens(bert, by_attention):
    """A score that silently fell back to the norm would pass the reference test only by chance."""
    example = _batch([12, 8, 5], 12, 0)
    by_norm = slimfx.compile(bert.model, PRUNE.format(block=1, keep=0.5, protect="cls"), example_inputs=example,
                             calib=[example])
    with torch.no_grad():
        assert (by_norm(**example).last_hidden_state - by_attention(**example).last_hidden_state).abs().max() > 1e-2
    assert "attention the first token pays" in by_attention.report.rules[1].notes[0]


def test_a_decoder_prunes_by_received_attention_and_keeps_its_last_position():
    lm = tiny("llama", layers=3)
    example = _batch([7, 4, 6], 7, 5, left=True)
    rules = "tokens unpad\ntokens after blocks[0] prune keep=0.5 score=attention restore=true"
    cm = slimfx.compile(lm.model, rules, example_inputs=example, calib=[example])
    with torch.no_grad():
        logits = cm(**example).logits
    assert logits.shape == lm.model(**example).logits.shape and torch.isfinite(logits).all()
    assert "mean attention they receive" in cm.report.rules[1].notes[0]
    assert cm.report.rules[1].details["tokens"] == ["17→9"]  # ⌈0.5·L⌉ of 7, 4, 6 = 4 + 2 + 3



def _merged_positions(dest: torch.Tensor) -> list[int]:
    """The position each merged token keeps (tome_ref.merge_tokens' dest): a group of several holds
    its B token (odd position) and the A tokens merged into it; a group of one, that token."""
    groups = [[t for t in range(dest.numel()) if dest[t] == g] for g in range(int(dest.max()) + 1)]
    return [next(t for t in group if t % 2) if len(group) > 1 else group[0] for group in groups]


def _kept_after_proportional_merge(model, ids: torch.Tensor, proportional: bool) -> list[int]:
    """One sequence: a ToMe merge (ratio 0.5) after block 0, then the positions that keep=0.5
    protect=cls keeps after block 1, ranked by block 1's CLS attention (post-norm BERT: from the
    block's input) — with log(size) added to each key's logits, as proportional attention makes
    the block compute, or without."""
    with torch.no_grad():
        h = model.encoder.layer[0](model.embeddings(input_ids=ids[None]))
        h = h[0] if isinstance(h, tuple) else h
        x, sizes, dest = merge_tokens(h[0], torch.ones(ids.numel()), 0.5, False)
        sa, heads = model.encoder.layer[1].attention.self, model.config.num_attention_heads
        split = lambda t: t.view(t.shape[0], heads, -1).transpose(0, 1)  # noqa: E731
        q, k = split(sa.query(x)), split(sa.key(x))
        logits = (q[:, :1] @ k.transpose(-1, -2))[:, 0] / q.shape[-1] ** 0.5
        score = torch.softmax(logits + (sizes.log() if proportional else 0), dim=-1).mean(0)
    keep = math.ceil(0.5 * x.shape[0] - 1e-9)
    ranked = sorted(range(x.shape[0]), key=lambda t: (-(math.inf if t == 0 else float(score[t])), t))
    positions = _merged_positions(dest)
    return [positions[t] for t in sorted(ranked[:keep])]


def test_attention_score_after_a_proportional_merge_is_the_attention_the_block_paid(bert):
    """score=attention after `prop_attn=true`: block 1's attention adds log(size) to each merged
    key, and the score left that out, ranking by an attention no block computed."""
    example = _batch([12, 8, 5], 12, 0)
    rules = ("tokens unpad\ntokens after blocks[0] merge ratio=0.5 prop_attn=true\n"
             "tokens after blocks[1] prune keep=0.5 score=attention protect=cls")
    cm = slimfx.compile(bert.model, rules, example_inputs=example, calib=[example])
    lengths = [16, 13, 9, 14]
    batch = _batch(lengths, 16, 3)
    with torch.no_grad():
        cm(**batch)
    positions = cm.kept_tokens["positions"]
    differs = 0
    for row, n in enumerate(lengths):
        ids = batch["input_ids"][row, :n]
        want = _kept_after_proportional_merge(bert.model, ids, True)
        assert positions[row][positions[row] >= 0].tolist() == want, row
        differs += want != _kept_after_proportional_merge(bert.model, ids, False)
    assert differs  # the sizes change which tokens are kept here: the test tells the two apart
