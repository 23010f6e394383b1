"""The token ops against direct implementations written here: packing is a row gather of the real
tokens, unpacking its inverse with zeros at padding, and packed attention equals the padded
batch's masked attention at every real position."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from slimfx.runtime import token_ops as T


@st.composite
def padded_masks(draw):
    batch = draw(st.integers(1, 4))
    seq = draw(st.integers(1, 9))
    lengths = draw(st.lists(st.integers(1, seq), min_size=batch, max_size=batch))
    left = draw(st.booleans())
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, seq - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


@settings(max_examples=40, deadline=None)
@given(padded_masks(), st.integers(0, 2**16))
def test_pack_is_the_real_rows_in_order_and_unpack_inverts_it(mask, seed):
    gen = torch.Generator().manual_seed(seed)
    B, S = mask.shape
    x = torch.randn(B, S, 5, generator=gen)
    bi, si = T.token_index(mask)
    packed = T.pack_tokens(x, bi, si, S, 0, 1)
    direct = torch.stack([x[b, s] for b in range(B) for s in range(S) if mask[b, s]])
    assert packed.shape == (1, int(mask.sum()), 5)
    assert torch.equal(packed[0], direct)
    back = T.unpack_tokens(packed, bi, si, B, S, 0, 1)
    assert torch.equal(back, x * mask[..., None])


def test_pack_of_a_table_without_batch_gathers_positions():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    bi, si = T.token_index(mask)
    table = torch.arange(3.0).view(1, 3, 1) * 10  # [1, S, 1]: one row per position
    packed = T.pack_tokens(table, bi, si, 3, T.NO_BATCH, 1)
    assert packed.flatten().tolist() == [10.0, 20.0, 0.0, 10.0]


def test_flat_layout_round_trip():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bi, si = T.token_index(mask)
    x = torch.randn(6, 4)  # [B·S, D]
    packed = T.pack_tokens(x, bi, si, 3, T.FLAT, 0)
    assert torch.equal(packed, x[[0, 1, 3]])
    back = T.unpack_tokens(packed, bi, si, 2, 3, T.FLAT, 0)
    assert torch.equal(back[[0, 1, 3]], packed) and back[[2, 4, 5]].abs().sum() == 0


@settings(max_examples=30, deadline=None)
@given(padded_masks(), st.booleans(), st.integers(0, 2**16))
def test_packed_attention_equals_masked_attention_at_real_positions(mask, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    B, S = mask.shape
    H, D = 2, 4
    q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
    keep = mask.bool()
    allowed = keep[:, None, None, :].expand(B, 1, S, S)
    if causal:
        allowed = allowed & torch.ones(S, S, dtype=torch.bool).tril()
    # Direct: the padded batch with the mask (rows of padding queries are not compared).
    allowed = allowed | ~keep[:, None, :, None]  # keep padding rows finite
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    bi, si = T.token_index(mask)
    pack = [T.pack_tokens(t, bi, si, S, 0, 2) for t in (q, k, v)]
    out = T.packed_attention(*pack, allowed, bi, si, B, None, False, False)
    got = T.unpack_tokens(out, bi, si, B, S, 0, 2)
    real = keep[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    assert got[~real].abs().sum() == 0


def test_token_index_refuses_a_mask_that_is_not_2d():
    import pytest

    with pytest.raises(ValueError, match="batch, seq"):
        T.token_index(torch.ones(2, 3, 4))


def test_merge_keeps_the_protected_first_token_of_every_sequence_and_tracks_sizes():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])
    bi, si = T.token_index(mask)
    x = torch.randn(1, bi.numel(), 6, generator=torch.Generator().manual_seed(0))
    x[0, 0] = x[0, 1]  # the first token is the best possible match: protection must still keep it
    out, sizes, bi2, si2, dest = T.token_merge(x, None, bi, si, 2, 0.5, True)
    # Sequence 0: 8 tokens, A = {0,2,4,6} minus the protected 0, so r = min(⌊0.5·8⌋, 3, 4) = 3;
    # sequence 1: 5 tokens, r = min(2, 2, 2) = 2. 13 − 5 = 8 tokens remain, in their order.
    assert out.shape == (1, 8, 6) and sizes.sum() == 13  # every token is counted somewhere
    assert bi2.tolist() == [0] * 5 + [1] * 3
    for first in (0, 8):
        assert torch.equal(out[0, dest[first]], x[0, first]) and sizes[dest[first]] == 1
    assert si2[0] == 0 and si2[5] == 0  # the first tokens keep their positions
    assert (si2[1:5].diff() > 0).all()  # positions stay in order within a sequence


def test_merge_takes_the_floor_of_the_decimal_ratio_times_the_length():
    """int(0.29 * 100) is 28 in floats: the documented ⌊0.29·100⌋ is 29 (0.35 of 180: 63, not 62)."""
    for ratio, length, merged in ((0.29, 100, 29), (0.35, 180, 63), (0.3, 10, 3)):
        bi, si = T.token_index(torch.ones(1, length, dtype=torch.long))
        x = torch.randn(1, length, 8, generator=torch.Generator().manual_seed(0))
        out = T.token_merge(x, None, bi, si, 1, ratio, False)[0]
        assert length - out.shape[1] == merged, (ratio, length)


def test_prune_keeps_the_largest_norms_and_the_protected_last_position():
    mask = torch.ones(1, 6, dtype=torch.long)
    bi, si = T.token_index(mask)
    x = torch.zeros(1, 6, 2)
    x[0, :, 0] = torch.tensor([5.0, 1.0, 4.0, 3.0, 6.0, 0.5])  # norms; the last is the smallest
    x[0, :, 1] = 0.1
    out, sizes, bi2, si2, dest = T.token_prune(x, None, bi, si, 1, 0.5, False, True)
    # ⌈0.5·6⌉ = 3 kept: the protected last position (the smallest norm), then the two largest
    # norms, positions 4 and 0; in their order.
    assert si2.tolist() == [0, 4, 5]
    assert torch.equal(out[0], x[0, [0, 4, 5]]) and sizes.tolist() == [1, 1, 1]
    # Each dropped token goes to the kept token most similar to it by cosine.
    unit = x[0] / x[0].norm(dim=-1, keepdim=True)
    for t in (1, 2, 3):
        assert dest[t] == int((unit[[0, 4, 5]] @ unit[t]).argmax())
    assert dest[[0, 4, 5]].tolist() == [0, 1, 2]


def test_prune_keeps_every_protected_position_when_it_keeps_fewer_tokens_than_they_are():
    """⌈0.2·4⌉ = 1 token kept, two protected (a decoder's first and last): both stay, and the
    largest norm (position 1) goes. Keeping one left position 0 alone, and prefill's next-token
    logits came from it."""
    bi, si = T.token_index(torch.ones(1, 4, dtype=torch.long))
    x = torch.tensor([[[0.1, 0.0], [9.0, 1.0], [5.0, 1.0], [0.2, 0.1]]])
    out, sizes, _, si2, _ = T.token_prune(x, None, bi, si, 1, 0.2, True, True)
    assert si2.tolist() == [0, 3] and torch.equal(out[0], x[0, [0, 3]]) and sizes.tolist() == [1, 1]


def test_proportional_attention_counts_a_merged_key_as_the_tokens_it_holds():
    """Keys (k1, k2) with sizes (1, 2) attend exactly like keys (k1, k2, k2) with sizes 1: the
    meaning of ToMe's proportional attention."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 2, 4, generator=gen)
    k = torch.randn(1, 2, 2, 4, generator=gen)
    v = torch.randn(1, 2, 2, 4, generator=gen)
    bi, si = torch.zeros(2, dtype=torch.long), torch.tensor([0, 1])
    got = T.packed_attention(q, k, v, None, bi, si, 1, None, False, False, torch.tensor([1.0, 2.0]))
    k3, v3 = torch.cat([k, k[:, :, 1:]], dim=2), torch.cat([v, v[:, :, 1:]], dim=2)
    want = F.scaled_dot_product_attention(q, k3, v3)
    torch.testing.assert_close(got, want)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with_mask = T.packed_attention(q, k, v, mask, bi, si, 1, None, False, False, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(with_mask, want)


def _direct_scores(q, k, received: bool) -> torch.Tensor:
    """One sequence's tokens alone (q/k [heads, L, d]): the first token's attention row, or for a
    causal decoder the mean of the attention each token receives over the L − j queries that see it."""
    heads, length, d = q.shape
    total = torch.zeros(length)
    for h in range(heads):
        logits = q[h] @ k[h].T / d ** 0.5
        if not received:
            total += torch.softmax(logits[0], dim=-1)
            continue
        for i in range(length):
            row = torch.softmax(logits[i, : i + 1], dim=-1)  # causal: query i sees keys 0..i
            total[: i + 1] += row / torch.arange(length, 0, -1)[: i + 1]
    return total / heads


@settings(max_examples=25, deadline=None)
@given(padded_masks(), st.integers(0, 2**16), st.booleans(), st.booleans())
def test_attention_score_equals_a_direct_softmax_per_sequence(mask, seed, received, gqa):
    """On a padded batch's packed tokens, with the padded model's own additive mask (dtype minimum
    at padding, as Hugging Face writes it), every sequence is scored as if it were alone."""
    gen = torch.Generator().manual_seed(seed)
    bi, si = T.token_index(mask)
    n, heads, kv = bi.numel(), 4, 2 if gqa else 4
    q = torch.randn(1, heads, n, 8, generator=gen)
    k = torch.randn(1, kv, n, 8, generator=gen)
    batch, seq = mask.shape
    allowed = mask.bool()[:, None, None, :].expand(batch, 1, seq, seq)
    if received:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool).tril()
    additive = torch.zeros(batch, 1, seq, seq).masked_fill(~allowed, torch.finfo(torch.float32).min)
    got = T.attention_score(q, k, additive, bi, si, batch, None, False, gqa, received)
    start = 0
    for b in range(batch):
        length = int(mask[b].sum())
        ks = k[0, :, start:start + length].repeat_interleave(heads // kv, dim=0)
        want = _direct_scores(q[0, :, start:start + length], ks, received)
        torch.testing.assert_close(got[start:start + length], want, atol=1e-5, rtol=1e-5)
        start += length
    if received:  # is_causal=True without a mask scores the same
        torch.testing.assert_close(T.attention_score(q, k, None, bi, si, batch, None, True, gqa, True), got,
                                   atol=1e-6, rtol=1e-6)


def test_prune_by_a_given_score_keeps_its_top_tokens_not_the_largest_norms():
    mask = torch.ones(1, 6, dtype=torch.long)
    bi, si = T.token_index(mask)
    x = torch.zeros(1, 6, 2)
    x[0, :, 0] = torch.tensor([5.0, 1.0, 4.0, 3.0, 6.0, 0.5])
    score = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.0, 0.3])
    _, _, _, si2, _ = T.token_prune(x, None, bi, si, 1, 0.5, False, False, score)
    assert si2.tolist() == [1, 3, 5]


def test_merge_by_a_given_metric_matches_on_it():
    """x makes tokens 0 and 1 identical, the metric makes 2 and 1: one merge follows the metric."""
    mask = torch.ones(1, 4, dtype=torch.long)
    bi, si = T.token_index(mask)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]])
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]])
    _, _, _, _, by_x = T.token_merge(x, None, bi, si, 1, 0.25, False)
    _, _, _, _, by_metric = T.token_merge(x, None, bi, si, 1, 0.25, False, metric)
    assert by_x.tolist() == [0, 0, 1, 2] and by_metric.tolist() == [0, 1, 1, 2]


# ---- device: every tensor an op makes goes where its inputs are ----------------------------------
# The CPU machines have no GPU, so "meta" as the default device stands in for one: a factory call
# that does not name its inputs' device makes a meta tensor, which the op's next step refuses.


def _every_op(x, q, k, mask2d, attn_mask):
    bi, si = T._token_index(mask2d)
    batch = mask2d.shape[0]
    packed, qp, kp = T._pack(x, bi, si, x.shape[1], 0, 1), T._pack(q, bi, si, q.shape[2], 0, 2), T._pack(k, bi, si, k.shape[2], 0, 2)
    score = T._attention_score(qp, kp, attn_mask, bi, si, batch, None, False, False, False)
    received = T._attention_score(qp, kp, None, bi, si, batch, None, True, False, True)
    merged = T._token_merge(packed, None, bi, si, batch, 0.4, True)
    pruned = T._token_prune(packed, None, bi, si, batch, 0.5, True, False, score)
    empty = T._token_merge(packed[:, :0], None, bi[:0], si[:0], batch, 0.4, True)
    repad = T._repad_tokens(pruned[0], pruned[2], batch, 0, 1, True)
    kept = T._kept_tokens(merged[2], merged[3], merged[1], batch, False)
    return [score, received, *merged, *pruned, *empty, repad, *kept]


def test_every_token_op_makes_its_tensors_on_its_inputs_device():
    g = torch.Generator().manual_seed(0)
    x, q, k = (torch.randn(shape, generator=g) for shape in ((2, 7, 4), (2, 2, 7, 4), (2, 2, 7, 4)))
    mask2d = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    attn_mask = mask2d.bool()[:, None, None, :].expand(2, 1, 7, 7)
    want = _every_op(x, q, k, mask2d, attn_mask)
    with torch.device("meta"):  # the default device inside
        got = _every_op(x, q, k, mask2d, attn_mask)
    assert len(got) == len(want)
    for g_, w in zip(got, want):
        assert g_.device.type == "cpu"
        torch.testing.assert_close(g_, w)


@settings(max_examples=30, deadline=None)
@given(padded_masks(), st.sampled_from(["bool", "additive"]), st.integers(0, 2**16))
def test_packed_attention_takes_a_padding_mask_that_broadcasts_over_queries(mask, kind, seed):
    """A [B, 1, 1, S] mask (one row of key padding for every query, as hand-written models build
    it) is sliced at its keys only: it has no query rows to select."""
    gen = torch.Generator().manual_seed(seed)
    B, S = mask.shape
    q, k, v = (torch.randn(B, 2, S, 4, generator=gen) for _ in range(3))
    keep = mask.bool()
    allowed = keep[:, None, None, :]
    attn_mask = allowed if kind == "bool" else torch.zeros(B, 1, 1, S).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    bi, si = T.token_index(mask)
    pack = [T.pack_tokens(t, bi, si, S, 0, 2) for t in (q, k, v)]
    got = T.unpack_tokens(T.packed_attention(*pack, attn_mask, bi, si, B, None, False, False), bi, si, B, S, 0, 2)
    real = keep[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


def test_a_mask_without_batch_dim_is_shared_by_every_sequence():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    causal = torch.ones(3, 3, dtype=torch.bool).tril()  # [S, S]: no batch, no heads
    sub = T._mask_of(causal, 1, torch.tensor([0, 1]))
    assert sub.shape == (1, 1, 2, 2) and torch.equal(sub[0, 0], causal[:2, :2])
    assert T._mask_of(mask[:, None, None, :].bool(), 1, torch.tensor([0, 1])).shape == (1, 1, 1, 2)
