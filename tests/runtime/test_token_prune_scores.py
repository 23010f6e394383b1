"""What `slimfx::token_prune` ranks by: `attention_score` with the sizes of proportional attention
(it scored as if every key held one token, while the block gave a merged key log(size) more), and
the ranking itself in float32 (a bf16 model's scores were rounded to bf16 first, and close scores
tied, so the earlier tokens were kept instead of the higher-scoring ones)."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings, strategies as st

from slimfx.runtime import token_ops as T


def _cls_row(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The first token's softmax row [L] of q/k [heads, L, d] with `bias` [L] added to the key
    logits, averaged over heads: written out, one head at a time."""
    rows = []
    for h in range(q.shape[0]):
        logits = [float(q[h, 0] @ k[h, j]) / math.sqrt(q.shape[-1]) + float(bias[j]) for j in range(k.shape[1])]
        top = max(logits)
        e = [math.exp(x - top) for x in logits]
        rows.append(torch.tensor([x / sum(e) for x in e]))
    return torch.stack(rows).mean(0)


def test_a_merged_key_scores_as_the_copies_it_holds():
    """Keys (k0, k1) with sizes (1, 2) score as (k0, k1, k1) with sizes 1 do, k1's copies summed."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 2, 4, generator=gen), torch.randn(1, 2, 2, 4, generator=gen)
    bi, si = torch.zeros(2, dtype=torch.long), torch.tensor([0, 1])
    got = T.attention_score(q, k, None, bi, si, 1, None, False, False, False, torch.tensor([1.0, 2.0]))
    k3 = torch.cat([k, k[:, :, 1:]], dim=2)
    copies = _cls_row(torch.cat([q, q[:, :, 1:]], dim=2)[0], k3[0], torch.zeros(3))
    torch.testing.assert_close(got, torch.stack([copies[0], copies[1] + copies[2]]), atol=1e-6, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2**16))
def test_attention_score_adds_log_size_per_sequence(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    n, heads = sum(lengths), 2
    bi = torch.cat([torch.full((length,), b) for b, length in enumerate(lengths)])
    si = torch.cat([torch.arange(length) for length in lengths])
    q, k = torch.randn(1, heads, n, 8, generator=gen), torch.randn(1, heads, n, 8, generator=gen)
    sizes = torch.randint(1, 5, (n,), generator=gen).float()
    got = T.attention_score(q, k, None, bi, si, len(lengths), None, False, False, False, sizes)
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        want = _cls_row(q[0, :, part], k[0, :, part], sizes[part].log())
        torch.testing.assert_close(got[part], want, atol=1e-5, rtol=1e-5)
        start += length


def test_a_bf16_prune_ranks_close_attention_scores_in_float32():
    # Distinct in float32, one value in bf16 (8 bits of mantissa): the top half is the last four.
    score = 0.125 + 1e-5 * torch.arange(8.0)
    assert score.to(torch.bfloat16).unique().numel() == 1
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    bi, si = torch.zeros(8, dtype=torch.long), torch.arange(8)
    kept = T.token_prune(x, None, bi, si, 1, 0.5, False, False, score)[3]
    assert kept.tolist() == [4, 5, 6, 7]


def test_a_bf16_prune_ranks_close_norms_in_float32():
    """Rows (1, e) of bf16 values: their norms √(1 + e²) differ by less than bf16 tells apart."""
    extra = torch.tensor([0.0, 0.03125, 0.0, 0.0625, 0.0, 0.046875])  # exact in bf16
    x = torch.zeros(1, 6, 2, dtype=torch.bfloat16)
    x[0, :, 0], x[0, :, 1] = 1.0, extra.to(torch.bfloat16)
    norms = x[0].double().norm(dim=-1)  # the test's own: every norm exactly, in float64
    want = sorted(torch.argsort(norms, descending=True, stable=True)[:3].tolist())
    assert want == [1, 3, 5]
    assert x[0].norm(dim=-1).unique().numel() < 3  # the bf16 norms cannot tell them apart
    bi, si = torch.zeros(6, dtype=torch.long), torch.arange(6)
    assert T.token_prune(x, None, bi, si, 1, 0.5, False, False)[3].tolist() == want
