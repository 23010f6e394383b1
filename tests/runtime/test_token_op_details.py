"""runtime/token_ops.py in detail, each against values worked out by hand or written out here (a
mutation audit found these changes survived every op test, or died only in slow pass tests far
from the op): an additive mask's values at real positions enter the attention score; merge
averages by the sizes it is given; prune keeps ⌈keep·L⌉ and its dest indexes the kept tokens;
right-aligned repadding for decoders."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings, strategies as st

from slimfx.runtime import token_ops as T


def _written_out_scores(q, k, bias, received: bool) -> torch.Tensor:
    """One sequence alone (q/k [heads, L, d], bias [heads, L, L] finite): the first token's row of
    softmax(q·kᵀ/√d + bias), or (received) the mean attention each key gets from the causal
    queries that see it; averaged over heads. Plain loops and math.exp."""
    heads, length, d = q.shape
    total = torch.zeros(length, dtype=torch.float64)
    for h in range(heads):
        rows = [0] if not received else range(length)
        for i in rows:
            keys = range(length) if not received else range(i + 1)
            logits = [float(q[h, i] @ k[h, j]) / math.sqrt(d) + float(bias[h, i, j]) for j in keys]
            top = max(logits)
            e = [math.exp(x - top) for x in logits]
            for j, x in zip(keys, e):
                total[j] += x / sum(e) / (1 if not received else length - j)
    return (total / heads).float()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=3), st.integers(0, 2**16), st.booleans())
def test_attention_score_adds_the_values_of_an_additive_mask_not_only_its_padding(lengths, seed, received):
    """An additive mask that carries a bias at real positions (ALiBi, a relative position bias,
    written into the mask the attention adds) is part of the softmax the block computed: the score
    adds it, as it excludes the dtype-minimum positions."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq, heads = len(lengths), max(lengths), 2
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    bi, si = T.token_index(mask)
    q = torch.randn(1, heads, bi.numel(), 8, generator=gen)
    k = torch.randn(1, heads, bi.numel(), 8, generator=gen)
    bias = 2 * torch.randn(batch, heads, seq, seq, generator=gen)
    allowed = mask.bool()[:, None, None, :].expand(batch, heads, seq, seq)
    if received:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool).tril()
    additive = bias.masked_fill(~allowed, torch.finfo(torch.float32).min)
    got = T.attention_score(q, k, additive, bi, si, batch, None, False, False, received)
    start = 0
    for b, n in enumerate(lengths):
        want = _written_out_scores(q[0, :, start:start + n], k[0, :, start:start + n], bias[b, :, :n, :n], received)
        torch.testing.assert_close(got[start:start + n], want, atol=1e-5, rtol=1e-4)
        start += n


def test_merge_averages_weighted_by_the_sizes_it_is_given():
    """Two tokens of sizes 3 and 1 merge into (3·a + b) / 4 with size 4, ToMe's size-weighted
    average (an unweighted one gives (a + b) / 2 and the same sizes)."""
    bi, si = torch.zeros(2, dtype=torch.long), torch.arange(2)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out, sizes, _, _, dest = T.token_merge(x, torch.tensor([3.0, 1.0]), bi, si, 1, 0.5, False)
    torch.testing.assert_close(out, torch.tensor([[[0.75, 0.25]]]))
    assert sizes.tolist() == [4.0] and dest.tolist() == [0, 0]


def test_prune_keeps_the_ceiling_of_keep_times_the_length():
    """⌈K·L⌉, not ⌊K·L⌋: keep=0.5 of 7 tokens keeps 4; 0.3 of 10 keeps 3 exactly (no float slip)."""
    for keep, length, kept in ((0.5, 7, 4), (0.3, 10, 3), (0.6, 12, 8), (0.01, 5, 1)):
        bi, si = torch.zeros(length, dtype=torch.long), torch.arange(length)
        x = torch.randn(1, length, 4, generator=torch.Generator().manual_seed(0))
        assert T.token_prune(x, None, bi, si, 1, keep, False, False)[0].shape[1] == kept, (keep, length)


def test_a_pruned_tokens_dest_indexes_the_kept_tokens_not_the_input():
    """dest is an index into the op's output: the dropped tokens 0 and 1 (small norms) go to their
    most similar kept token, output rows 0 and 1 (input tokens 2 and 3), not input rows 2 and 3."""
    bi, si = torch.zeros(4, dtype=torch.long), torch.arange(4)
    x = torch.tensor([[[0.1, 0.0], [0.0, 0.1], [5.0, 0.0], [0.0, 5.0]]])
    out, _, _, si2, dest = T.token_prune(x, None, bi, si, 1, 0.5, False, False)
    assert si2.tolist() == [2, 3]
    assert dest.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(out[0, dest], torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]]))


def test_repad_and_kept_tokens_on_the_right_put_each_sequences_last_token_last():
    """right=True (decoders): sequences of 3 and 1 remaining tokens become [[a, b, c], [0, 0, d]];
    kept_tokens says the same grid: positions −1 and sizes 0 at the padding, in front."""
    bi, si = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 2, 5, 4])
    x = torch.arange(1.0, 5.0).view(1, 4, 1)
    sizes = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert T.repad_tokens(x, bi, 2, 0, 1, True)[..., 0].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert T.repad_tokens(x, bi, 2, 0, 1, False)[..., 0].tolist() == [[1, 2, 3], [4, 0, 0]]
    positions, held = T.kept_tokens(bi, si, sizes, 2, True)
    assert positions.tolist() == [[0, 2, 5], [-1, -1, 4]]
    assert held.tolist() == [[1, 2, 3], [0, 0, 4]]
