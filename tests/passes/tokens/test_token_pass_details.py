"""The token pass in detail (a mutation audit found these changes survived every pass test):
proportional attention adds log(size) in every later block, against a direct run; a prune after
a proportional merge weighs keys by the prune's sizes; a decoder's score=attention is the mean
attention each token receives; a per-token value read across a merge, and a restore=false output
that flattens batch and sequence, are refused by name; protect=none lets the first token merge;
an attention causal by `is_causal=True` alone stays causal when packed."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimfx
from slimfx.models import tiny

from test_merge import _batch
from tome_ref import merge_tokens, prune_tokens


# ---- prop_attn=true against a direct run: every later attention adds log(size) of its keys --------

def _bert_proportional(model, ids: torch.Tensor, merge_after: tuple[int, ...], ratio: float) -> torch.Tensor:
    """One unpadded sequence through a BERT with a ToMe merge (tome_ref.py, protect=cls) after the
    given blocks and ToMe's proportional attention in every block after the first merge: the
    block's attention gets log(size) of each key as an additive mask. Every position takes the
    final state of the token it went to."""
    with torch.no_grad():
        h = model.embeddings(input_ids=ids[None])
        sizes, dest = torch.ones(ids.numel()), torch.arange(ids.numel())
        for i, layer in enumerate(model.encoder.layer):
            bias = sizes.log().view(1, 1, 1, -1)
            out = layer(h, attention_mask=bias)
            h = out[0] if isinstance(out, tuple) else out
            if i in merge_after:
                x, sizes, d = merge_tokens(h[0], sizes, ratio, True)
                h, dest = x[None], d[dest]
        return h[0][dest]


def test_proportional_attention_equals_a_direct_run_with_log_size_in_every_later_block(bert):
    """Two merges (after blocks 0 and 1): block 1 sees the first merge's sizes, blocks 2 and 3 the
    second's. The existing test only checks that prop_attn changes the output."""
    example = _batch([12, 8, 5], 12, 0)
    rules = "tokens unpad\ntokens after blocks[0:2] merge ratio=0.4 protect=cls prop_attn=true restore=true"
    cm = slimfx.compile(bert.model, rules, example_inputs=example, calib=[example])
    lengths = [14, 9, 6]
    batch = _batch(lengths, 14, 11)
    with torch.no_grad():
        got = cm(**batch).last_hidden_state
    for row, n in enumerate(lengths):
        want = _bert_proportional(bert.model, batch["input_ids"][row, :n], (0, 1), 0.4)
        torch.testing.assert_close(got[row, :n], want, atol=1e-5, rtol=1e-4)


def test_attention_after_a_prune_that_follows_a_proportional_merge_uses_the_prunes_sizes(bert):
    """merge (prop_attn) after block 0, prune after block 1: blocks 2 and 3 weigh the kept tokens'
    keys by their own sizes, one per token that remains (not the merge's longer size vector)."""
    example = _batch([12, 8, 5], 12, 0)
    rules = ("tokens unpad\ntokens after blocks[0] merge ratio=0.5 protect=cls prop_attn=true restore=true\n"
             "tokens after blocks[1] prune keep=0.6 score=norm protect=cls restore=true")
    cm = slimfx.compile(bert.model, rules, example_inputs=example, calib=[example])
    lengths = [13, 7]
    batch = _batch(lengths, 13, 5)
    with torch.no_grad():
        got = cm(**batch).last_hidden_state
    for row, n in enumerate(lengths):
        ids = batch["input_ids"][row, :n]
        with torch.no_grad():
            h = bert.model.embeddings(input_ids=ids[None])
            sizes, dest = torch.ones(n), torch.arange(n)
            for i, layer in enumerate(bert.model.encoder.layer):
                out = layer(h, attention_mask=sizes.log().view(1, 1, 1, -1))
                h = out[0] if isinstance(out, tuple) else out
                if i == 0:
                    x, sizes, d = merge_tokens(h[0], sizes, 0.5, True)
                elif i == 1:
                    x, sizes, d = prune_tokens(h[0], sizes, 0.6, True)
                else:
                    continue
                h, dest = x[None], d[dest]
            want = h[0][dest]
        torch.testing.assert_close(got[row, :n], want, atol=1e-5, rtol=1e-4)


# ---- a decoder's score=attention is the mean attention each token receives --------------------

def _received_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [heads, L, d], k [kv heads, L, d] of one causal sequence: the mean over the L − j queries
    that see key j of the attention it gets, averaged over heads."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    length = q.shape[1]
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    logits = logits.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), -math.inf)
    return (torch.softmax(logits, -1).sum(1) / torch.arange(length, 0, -1)).mean(0)


def test_a_decoder_prunes_the_tokens_that_receive_the_most_attention():
    """The kept positions equal those a direct run of block 0's own queries and keys ranks first
    (the last position always kept). The first token's row, an encoder's score, sees only itself
    on a causal model and would keep the first positions."""
    lm = tiny("llama", layers=3)
    with torch.no_grad():  # peaked attention: random tiny weights attend almost uniformly, and a near-
        attn = lm.model.model.layers[0].self_attn  # uniform causal attention ranks the first tokens first
        attn.q_proj.weight.mul_(8)
        attn.k_proj.weight.mul_(8)
    lengths = [9, 6, 8]
    example = _batch(lengths, 9, 5)  # right padding: each sequence's positions are 0..n−1 as alone
    rules = "tokens unpad\ntokens after blocks[0] prune keep=0.5 score=attention protect=none restore=false"
    cm = slimfx.compile(lm.model, rules, example_inputs=example, calib=[example])
    with torch.no_grad():
        cm(**example)
    positions = cm.kept_tokens["positions"]
    seen, differs = [], 0
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def record(q, k, v, *args, **kwargs):
        seen.append((q[0], k[0]))
        return real_sdpa(q, k, v, *args, **kwargs)

    for row, n in enumerate(lengths):
        seen.clear()
        torch.nn.functional.scaled_dot_product_attention = record
        try:
            with torch.no_grad():
                lm.model(input_ids=example["input_ids"][row:row + 1, :n])
        finally:
            torch.nn.functional.scaled_dot_product_attention = real_sdpa
        score = _received_scores(*seen[0])
        score[-1] = math.inf
        want = sorted(torch.argsort(score, descending=True, stable=True)[:math.ceil(0.5 * n)].tolist())
        got = positions[row][positions[row] >= 0].tolist()
        assert got == want, (row, got, want)
        differs += want != list(range(len(want) - 1)) + [n - 1]  # what the first token's row keeps
    assert differs  # the test tells received attention from an encoder's first-token row


# ---- a per-token value from before the merge read after it is refused by name ---------------

class _Block(nn.Module):
    """Attention over the mask (or causal by `is_causal=True` alone), plus `emb` added back."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, h, mask, emb):
        B, S, D = h.shape
        q, k, v = (f(h).view(B, S, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.causal:  # no mask: the causal flag only
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].bool())
        return h + self.o(a.transpose(1, 2).reshape(B, S, D)) + 0.1 * emb


class _Stack(nn.Module):
    """An embedding and blocks; `reread`: every block adds the embedding again (a per-token value
    from before any merge), `flat`: returns [B·S, D], `masked`: zeroes padding at the output."""

    def __init__(self, blocks: int = 3, causal: bool = False, reread: bool = False, flat: bool = False,
                 masked: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([_Block(causal) for _ in range(blocks)])
        self.reread, self.flat, self.masked = reread, flat, masked

    def forward(self, input_ids, attention_mask):
        e = self.emb(input_ids)
        h = e
        for layer in self.layers:
            h = layer(h, attention_mask, e if self.reread else torch.zeros_like(e[:1, :1]))
        if self.masked:
            h = h * attention_mask[..., None]
        return h.reshape(-1, h.shape[-1]) if self.flat else h


def test_a_per_token_value_from_before_the_merge_read_after_it_is_refused():
    """The embedding is packed once for block 0 and read again by block 1 after the merge: on the
    merged tokens it has the wrong length, so the pass refuses by name instead of failing later."""
    example = {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0)),
               "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with pytest.raises(slimfx.SpecError, match="holds one value per token from before the merge"):
        slimfx.compile(_Stack(reread=True).eval(), "tokens unpad\ntokens after blocks[0] merge ratio=0.3",
                       example_inputs=example, calib=[example])


def test_restore_false_refuses_an_output_that_flattens_batch_and_sequence():
    example = {"input_ids": torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0)),
               "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    model = _Stack(flat=True).eval()
    with pytest.raises(slimfx.SpecError, match="flattens batch and sequence into one dim"):
        slimfx.compile(model, "tokens unpad\ntokens after blocks[0] merge ratio=0.3 restore=false",
                       example_inputs=example, calib=[example])
    cm = slimfx.compile(model, "tokens unpad\ntokens after blocks[0] merge ratio=0.3 restore=true",
                        example_inputs=example, calib=[example])
    with torch.no_grad():
        assert cm(**example).shape == (12, 16)


def test_protect_none_lets_the_first_token_merge_and_protect_cls_keeps_it(bert):
    """ratio=0.5 of an even L takes every A token (r = L/2 = |A|) with protect=none, the first
    included: only odd positions remain. protect=cls takes one fewer and keeps position 0."""
    example = _batch([12, 8, 6], 12, 0)
    kept = {}
    for protect in ("none", "cls"):
        rules = f"tokens unpad\ntokens after blocks[1] merge ratio=0.5 protect={protect} restore=false"
        cm = slimfx.compile(bert.model, rules, example_inputs=example, calib=[example])
        with torch.no_grad():
            cm(**example)
        kept[protect] = cm.kept_tokens["positions"]
    for row, n in enumerate((12, 8, 6)):
        none = kept["none"][row][kept["none"][row] >= 0].tolist()
        cls = kept["cls"][row][kept["cls"][row] >= 0].tolist()
        assert len(none) == n // 2 and all(p % 2 == 1 for p in none), none
        assert len(cls) == n // 2 + 1 and cls[0] == 0, cls


def test_unpad_keeps_an_attentions_is_causal_flag():
    """Attention causal by `is_causal=True` alone (no mask): each sequence's packed attention
    stays causal. Right padding: a real token never sees the padding after it, so the padded
    model is exact at real positions."""
    model = _Stack(blocks=2, causal=True, masked=True).eval()
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]])
    example = {"input_ids": torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1)),
               "attention_mask": mask}
    cm = slimfx.compile(model, "tokens unpad", example_inputs=example, calib=[example])
    with torch.no_grad():
        want, got = model(**example), cm(**example)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
