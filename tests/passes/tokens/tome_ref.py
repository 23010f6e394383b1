"""A direct implementation of ToMe's bipartite soft matching (Bolya et al. 2023), written apart from
slimfx's op with plain loops, and a tiny BERT run one sequence at a time with merges after given
blocks: the outside reference for `tokens after … merge`."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_tokens(x: torch.Tensor, sizes: torch.Tensor, ratio: float, protect_first: bool):
    """x [L, D], sizes [L] -> (x', sizes', dest [L]); tokens keep their original order."""
    length = x.shape[0]
    a = list(range(0, length, 2))
    b = list(range(1, length, 2))
    r = min(int(ratio * length), len(a) - (1 if protect_first else 0), len(b))
    if r <= 0:
        return x, sizes, torch.arange(length)
    best, match = [], []
    for i in a:
        sims = [float(F.cosine_similarity(x[i], x[j], dim=0)) for j in b]
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


def bert_with_merges(model, ids: torch.Tensor, after: set[int], ratio: float, protect_first: bool) -> torch.Tensor:
    """Last hidden states [L, D] of one unpadded sequence, merging after each block in `after` and
    giving every position the final state of the token it merged into."""
    return bert_with_token_ops(model, ids, {i: lambda x, s: merge_tokens(x, s, ratio, protect_first) for i in after})


def prune_tokens(x: torch.Tensor, sizes: torch.Tensor, keep: float, protect_first: bool):
    """x [L, D] -> the ⌈keep·L⌉ rows of largest norm (the first always when protected), in order,
    and dest [L]: a dropped row goes to its most cosine-similar kept row."""
    import math

    length = x.shape[0]
    k = max(1, math.ceil(keep * length - 1e-9), 1 if protect_first else 0)
    norms = [float(x[t].norm()) for t in range(length)]
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
    """bert_with_merges for any mix: ops maps a block index to a function (x, sizes) -> (x, sizes, dest)."""
    with torch.no_grad():
        h = model.embeddings(input_ids=ids[None])
        sizes = torch.ones(ids.numel())
        dest = torch.arange(ids.numel())
        for i, layer in enumerate(model.encoder.layer):
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out
            if i in ops:
                x, sizes, d = ops[i](h[0], sizes)
                h = x[None]
                dest = d[dest]
        return h[0][dest]
