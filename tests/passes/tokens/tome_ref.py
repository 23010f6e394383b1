"""A direct implementation of ToMe's bipartite soft matching (Bolya et al. 2023), written apart from
slimfx's op with plain loops, and a tiny BERT run one sequence at a time with merges after given
blocks (and a ViT, one image at a time): the outside reference for `tokens after … merge|prune`."""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F


def merge_tokens(x: torch.Tensor, sizes: torch.Tensor, ratio: float, protect_first: bool, metric=None):
    """x [L, D], sizes [L] -> (x', sizes', dest [L]); tokens keep their original order. Similarity
    is the cosine of `metric` [L, d] (ToMe's keys) when given, else of x."""
    m = x if metric is None else metric
    length = x.shape[0]
    a = list(range(0, length, 2))
    b = list(range(1, length, 2))
    r = min(math.floor(Fraction(str(ratio)) * length), len(a) - (1 if protect_first else 0), len(b))  # exact ⌊r·L⌋
    if r <= 0:
        return x, sizes, torch.arange(length)
    best, match = [], []
    for i in a:
        sims = [float(F.cosine_similarity(m[i], m[j], dim=0)) for j in b]
        if protect_first and i == 0:
            sims = [float("-inf")] * len(b)
        k = max(range(len(b)), key=lambda j: (sims[j], -j))  # first of equal maxima
        best.append(sims[k])
        match.append(b[k])
    ranked = sorted(range(len(a)), key=lambda i: -best[i])  # stable: ties keep their order
    into = {a[i]: match[i] for i in ranked[:r]}
    kept = [t for t in range(length) if t not in into]
    rows, new_sizes = [], []
    for t in kept:
        group = [t] + [s for s, d in into.items() if d == t]
        w = torch.stack([sizes[g] for g in group])
        rows.append((torch.stack([x[g] for g in group]) * w[:, None]).sum(0) / w.sum())
        new_sizes.append(w.sum())
    where = {t: k for k, t in enumerate(kept)}
    dest = torch.tensor([where[into.get(t, t)] for t in range(length)])
    return torch.stack(rows), torch.stack(new_sizes), dest


def prune_tokens(x: torch.Tensor, sizes: torch.Tensor, keep: float, protect_first: bool, score=None):
    """x [L, D] -> the ⌈keep·L⌉ rows of largest `score` (default: norm; the first always when
    protected), in order, and dest [L]: a dropped row goes to its most cosine-similar kept row."""
    import math

    length = x.shape[0]
    k = max(1, math.ceil(keep * length - 1e-9), 1 if protect_first else 0)
    norms = [float(x[t].norm() if score is None else score[t]) for t in range(length)]
    ranked = sorted(range(length), key=lambda t: (-(math.inf if protect_first and t == 0 else norms[t]), t))
    kept = sorted(ranked[:k])
    where = {t: i for i, t in enumerate(kept)}
    dest = []
    for t in range(length):
        if t in where:
            dest.append(where[t])
        else:
            sims = [float(F.cosine_similarity(x[t], x[u], dim=0)) for u in kept]
            dest.append(max(range(len(kept)), key=lambda i: (sims[i], -i)))
    return x[kept], sizes[kept], torch.tensor(dest)


def bert_with_token_ops(model, ids: torch.Tensor, ops: dict) -> torch.Tensor:
    """Last hidden states [L, D] of one unpadded sequence with token ops after blocks: ops maps a
    block index to a function (x, sizes, qk) -> (x, sizes, dest) (merge_tokens, prune_tokens);
    every position takes the final state of the token it went to. qk() gives the block's queries and keys [heads, L, d] (BERT is post-norm:
    projected from the block's input)."""
    with torch.no_grad():
        h = model.embeddings(input_ids=ids[None])
        return _run_blocks(model.encoder.layer, h, ops, lambda layer, x: _heads(layer.attention.self.query(x),
                                                                               layer.attention.self.key(x),
                                                                               model.config.num_attention_heads))


def vit_with_token_ops(model, pixels: torch.Tensor, ops: dict) -> torch.Tensor:
    """The logits of a ViTForImageClassification on one image [C, H, W] with token ops after
    blocks (as bert_with_token_ops; ViT is pre-norm: q/k from layernorm_before of the input)."""
    with torch.no_grad():
        h = model.vit.embeddings(pixels[None])
        h = _run_blocks(model.vit.layers, h, ops, lambda layer, x: _heads(
            layer.attention.q_proj(layer.layernorm_before(x)), layer.attention.k_proj(layer.layernorm_before(x)),
            model.config.num_attention_heads))
        return model.classifier(model.vit.layernorm(h)[0])


def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention the first token pays each token, [L]: softmax(q₀·kᵀ/√d) averaged over heads."""
    rows = [torch.softmax(q[h, 0] @ k[h].T / q.shape[-1] ** 0.5, dim=-1) for h in range(q.shape[0])]
    return torch.stack(rows).mean(0)


def _heads(q: torch.Tensor, k: torch.Tensor, heads: int):
    """[1, L, heads·d] projections -> [heads, L, d] each."""
    split = lambda t: t[0].view(t.shape[1], heads, -1).transpose(0, 1)  # noqa: E731
    return split(q), split(k)


def _run_blocks(layers, h: torch.Tensor, ops: dict, qk) -> torch.Tensor:
    """h [1, L, D] through `layers` with ops[i](x, sizes, qk_thunk) after block i; every position
    of the result takes the final state of the token it went to."""
    sizes = torch.ones(h.shape[1])
    dest = torch.arange(h.shape[1])
    for i, layer in enumerate(layers):
        h_in = h
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
        if i in ops:
            x, sizes, d = ops[i](h[0], sizes, lambda layer=layer, h_in=h_in: qk(layer, h_in))
            h = x[None]
            dest = d[dest]
    return h[0][dest] if h.shape[0] == 1 and h.dim() == 3 else h
