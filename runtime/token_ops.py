"""The custom ops of the token pass's `tokens unpad`: computing on the real tokens of a padded batch.

A padded batch [B, S, …] becomes one packed row [1, N, …] of its N real tokens (row-major, so each
sequence's tokens are contiguous and in order); per-token ops run on it unchanged, attention runs
per sequence, and the padded layout comes back at the outputs with zeros at padding positions.

    bi, si = torch.ops.slimfx.token_index(attention_mask)        # [N] batch and position of each token
    p = torch.ops.slimfx.pack_tokens(x, bi, si, S, 0, 1)         # [B, S, D] -> [1, N, D]
    y = torch.ops.slimfx.unpack_tokens(p, bi, si, B, S, 0, 1)    # [1, N, D] -> [B, S, D], zeros at padding
    o = torch.ops.slimfx.packed_attention(q, k, v, mask, bi, si, B, scale, False, False)
    x2, sizes2, bi2, si2, dest = torch.ops.slimfx.token_merge(p, None, bi, si, B, 0.3, True)   # ToMe
    s = torch.ops.slimfx.attention_score(q, k, mask, bi, si, B, scale, False, False, False)  # [N]

`batch_dim`/`seq_dim` say where the batch and the sequence sit in the *unpacked* tensor;
`batch_dim = FLAT` (-1) means `seq_dim` holds batch×sequence flattened (GPT-2's [B·S, D] linears);
`batch_dim = NO_BATCH` (-2) means the tensor has no batch (a [1, S, D] rotary table or position
embedding, the same for every sequence): packing gathers positions only. A batch dim of size 1 is
broadcast the same way.

The reference implementations are the meaning; the fake ones give the packed length N as a new
unbacked symbolic size (it depends on the mask's values), so graphs with these ops still trace.
Gradients are not defined: an unpadded model is for inference (train adapters before `tokens unpad`).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["FLAT", "NO_BATCH", "token_index", "pack_tokens", "unpack_tokens", "packed_attention", "token_merge",
           "token_prune", "attention_score", "repad_tokens", "kept_tokens"]

FLAT = -1
NO_BATCH = -2


def _token_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if mask.dim() != 2:
        raise ValueError(f"slimfx::token_index: the attention mask must be [batch, seq], got {tuple(mask.shape)}")
    nz = torch.nonzero(mask != 0)
    return nz[:, 0].clone(), nz[:, 1].clone()


def _token_index_fake(mask):
    n = torch.library.get_ctx().new_dynamic_size()
    return mask.new_empty((n,), dtype=torch.long), mask.new_empty((n,), dtype=torch.long)


def _packed_shape(shape, n, batch_dim: int, seq_dim: int) -> list:
    out = list(shape)
    out[seq_dim] = n
    if batch_dim >= 0:
        out[batch_dim] = 1
    return out


def _pack(x: torch.Tensor, bi: torch.Tensor, si: torch.Tensor, seq: int, batch_dim: int,
          seq_dim: int) -> torch.Tensor:
    if batch_dim == FLAT:
        return x.index_select(seq_dim, bi * seq + si)
    if batch_dim == NO_BATCH or x.shape[batch_dim] == 1:
        return x.index_select(seq_dim, si)
    y = x.movedim((batch_dim, seq_dim), (0, 1))[bi, si]  # [N, rest…]
    return y.unsqueeze(0).movedim((0, 1), (batch_dim, seq_dim)).contiguous()


def _pack_fake(x, bi, si, seq, batch_dim, seq_dim):
    return x.new_empty(_packed_shape(x.shape, bi.shape[0], batch_dim, seq_dim))


def _unpack(x: torch.Tensor, bi: torch.Tensor, si: torch.Tensor, batch: int, seq: int, batch_dim: int,
            seq_dim: int) -> torch.Tensor:
    if batch_dim == FLAT:
        shape = list(x.shape)
        shape[seq_dim] = batch * seq
        out = x.new_zeros(shape)
        return out.index_copy(seq_dim, bi * seq + si, x)
    if batch_dim == NO_BATCH:
        raise ValueError("slimfx::unpack_tokens: a tensor without a batch dim cannot be unpacked")
    shape = list(x.shape)
    shape[batch_dim], shape[seq_dim] = batch, seq
    out = x.new_zeros(shape)
    moved = out.movedim((batch_dim, seq_dim), (0, 1))  # a view: writing it writes `out`
    moved[bi, si] = x.movedim((batch_dim, seq_dim), (0, 1))[0]
    return out


def _unpack_fake(x, bi, si, batch, seq, batch_dim, seq_dim):
    shape = list(x.shape)
    if batch_dim == FLAT:
        shape[seq_dim] = batch * seq
    else:
        shape[batch_dim], shape[seq_dim] = batch, seq
    return x.new_empty(shape)


def _sequence_bounds(bi: torch.Tensor, batch: int) -> list[tuple[int, int, int]]:
    """(sequence, start, end) in the packed order of every sequence with at least one token."""
    counts = torch.bincount(bi, minlength=batch).tolist()
    bounds, start = [], 0
    for b, c in enumerate(counts):
        if c:
            bounds.append((b, start, start + c))
        start += c
    return bounds


def _packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      bi: torch.Tensor, si: torch.Tensor, batch: int, scale: Optional[float],
                      is_causal: bool, enable_gqa: bool, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`scaled_dot_product_attention` of each sequence's tokens among themselves.

    q/k/v are [1, heads, N, d]; `mask` is the original [B | 1, heads | 1, S, S] mask (bool or
    additive), each sequence attends with its own rows and columns of it at its real positions,
    which is exactly what the padded model computed at those positions. A causal mask needs no
    change: positions stay in order inside a sequence. `sizes` (ToMe's proportional attention)
    adds log(size) of each key to the logits, so a merged token counts as the tokens it holds.
    """
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    for b, start, end in _sequence_bounds(bi, batch):
        sub = _mask_of(mask, b, si[start:end])
        if sizes is not None:
            bias = sizes[start:end].log().to(q.dtype).view(1, 1, 1, -1)
            if sub is None:
                sub = bias
            elif sub.dtype == torch.bool:
                sub = torch.where(sub, bias, torch.full_like(bias, -math.inf))
            else:
                sub = sub + bias
        out[:, :, start:end] = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], attn_mask=sub,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out


def _mask_of(mask: Optional[torch.Tensor], b: int, pos: torch.Tensor) -> Optional[torch.Tensor]:
    """Sequence b's rows and columns of the original attention mask, at its positions `pos`, as
    [1, heads | 1, n | 1, n | 1]. The mask broadcasts as scaled_dot_product_attention's does: a
    size-1 dim is left as it is (a [B, 1, 1, S] padding mask has one query row for every query),
    and a mask of fewer than 4 dims has no batch dim."""
    if mask is None:
        return None
    m = mask
    if m.dim() == 4:
        m = m[b if m.shape[0] > 1 else 0]
    if m.shape[-2] > 1:
        m = m.index_select(-2, pos)
    if m.shape[-1] > 1:
        m = m.index_select(-1, pos)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m


def _attention_score(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], bi: torch.Tensor,
                     si: torch.Tensor, batch: int, scale: Optional[float], is_causal: bool, enable_gqa: bool,
                     received: bool, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How much attention each packed token gets, from the queries and keys of an attention
    (q/k [1, heads, N, d] and the mask as `packed_attention` takes them), averaged over heads.

    `received=False` (encoders): the attention the sequence's first token (CLS) pays it — only that
    softmax row is computed. `received=True` (decoders): the mean of the attention it receives
    over the queries allowed to see it (with a causal mask, the L − j queries at or after it), so
    late tokens are not ranked low merely for having fewer queries after them. `sizes`: the
    attention's own (proportional attention after a `prop_attn` merge), log(size) added to each
    key's logits as packed_attention adds it, so the score is the softmax the block computed.
    Returns [N] float."""
    out = q.new_zeros(q.shape[2], dtype=torch.float32)
    for b, start, end in _sequence_bounds(bi, batch):
        qs, ks = q[0, :, start:end].float(), k[0, :, start:end].float()
        if enable_gqa and ks.shape[0] != qs.shape[0]:
            ks = ks.repeat_interleave(qs.shape[0] // ks.shape[0], dim=0)
        length = end - start
        if not received:
            qs = qs[:, :1]
        logits = (qs @ ks.transpose(-1, -2)) * (scale if scale is not None else qs.shape[-1] ** -0.5)
        if sizes is not None:  # rounded as packed_attention rounds its bias
            logits = logits + sizes[start:end].log().to(q.dtype).float()
        allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device)
        if is_causal:
            allowed = torch.ones(length, length, dtype=torch.bool, device=logits.device).tril()[: logits.shape[-2]]
        sub = _mask_of(mask, b, si[start:end])
        if sub is not None:
            sub = sub[0, :, : logits.shape[-2]]
            if sub.dtype == torch.bool:
                allowed = allowed & sub
            else:  # additive; Hugging Face writes "masked" as the dtype's minimum, not −inf
                allowed = allowed & (sub > torch.finfo(sub.dtype).min / 2)
                logits = logits + sub.float()
        logits = logits.masked_fill(~allowed, -math.inf)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(0)  # [rows, L], mean over heads
        if received:
            seen = allowed.expand(logits.shape).any(0).sum(0).clamp_min(1)  # queries that may see each key
            out[start:end] = probs.sum(0) / seen
        else:
            out[start:end] = probs[0]
    return out


def _attention_score_fake(q, k, mask, bi, si, batch, scale, is_causal, enable_gqa, received, sizes=None):
    return q.new_empty((q.shape[2],), dtype=torch.float32)


def _packed_attention_fake(q, k, v, mask, bi, si, batch, scale, is_causal, enable_gqa, sizes=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _merge_sequence(x: torch.Tensor, sizes: torch.Tensor, metric: Optional[torch.Tensor], ratio: float,
                    protect_first: bool):
    """ToMe's bipartite soft matching on one sequence's tokens x [L, D] with sizes [L].

    Alternate tokens into A (even positions) and B (odd), match each A token to its most similar B
    token by cosine (of `metric` [L, d] when given — the attention keys, `by=keys` — else of x), and merge the r = ⌊ratio·L⌋ best-matched A tokens into their B tokens by
    size-weighted average (at most |A|; the first token never leaves when `protect_first`).
    Returns (merged x [L−r, D] in the original order, sizes [L−r], kept local indices [L−r],
    dest [L]: where each input token went)."""
    length = x.shape[0]
    a_idx = torch.arange(0, length, 2, device=x.device)
    b_idx = torch.arange(1, length, 2, device=x.device)
    candidates = a_idx.numel() - (1 if protect_first else 0)
    # ⌊ratio·L⌋ of the decimal the policy wrote: int(0.29 * 100) is 28 in floats (as prune's ⌈keep·L⌉)
    r = min(math.floor(ratio * length + 1e-9), candidates, b_idx.numel())
    if r <= 0:
        keep = torch.arange(length, device=x.device)
        return x, sizes, keep, keep.clone()
    m = x if metric is None else metric
    unit = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = unit[a_idx] @ unit[b_idx].T
    if protect_first:
        scores[0] = -math.inf
    best, match = scores.max(dim=-1)
    order = torch.argsort(best, descending=True, stable=True)
    src = a_idx[order[:r]]
    dst = b_idx[match[order[:r]]]
    target = torch.arange(length, device=x.device)
    target[src] = dst
    weighted = torch.zeros_like(x).index_add_(0, target, x * sizes[:, None])
    total = torch.zeros_like(sizes).index_add_(0, target, sizes)
    gone = torch.zeros(length, dtype=torch.bool, device=x.device)
    gone[src] = True
    keep = (~gone).nonzero().flatten()
    new_index = torch.cumsum(~gone, 0) - 1
    dest = new_index[target]
    return (weighted[keep] / total[keep, None]).to(x.dtype), total[keep], keep, dest


def _token_merge(x: torch.Tensor, sizes: Optional[torch.Tensor], bi: torch.Tensor, si: torch.Tensor, batch: int,
                 ratio: float, protect_first: bool, metric: Optional[torch.Tensor] = None):
    """ToMe merging of each sequence of packed tokens x [1, N, D] (see _merge_sequence); `metric`
    [1, N, d] is what similarity is measured on (default: x itself).

    Returns (x [1, N', D], sizes [N'], batch_index [N'], seq_index [N'], dest [N]): each merged
    token keeps the batch and position of the B token it merged into; dest[i] is where token i of
    the input went (restoring the input's length is x[:, dest])."""
    return _per_sequence(_merge_sequence, x, sizes, metric, bi, si, batch, ratio, protect_first)


def _prune_sequence(x: torch.Tensor, sizes: torch.Tensor, score: Optional[torch.Tensor], keep: float,
                    protect_first: bool, protect_last: bool):
    """Keep the ⌈keep·L⌉ tokens of x [L, D] with the largest `score` [L] (default: the norm of x;
    protected ones always), in order; a dropped token's dest is its nearest kept token by cosine.
    Same returns as _merge_sequence."""
    length = x.shape[0]
    k = min(length, max(1, math.ceil(keep * length - 1e-9)))
    # Ranked in float32 whatever x's dtype: bf16 keeps 8 bits of mantissa, so attention scores or
    # norms a few parts in a thousand apart would tie and the stable sort would keep the earlier.
    score = x.float().norm(dim=-1) if score is None else score.float()
    protected = torch.zeros(length, dtype=torch.bool, device=x.device)
    if protect_first:
        protected[0] = True
    if protect_last:
        protected[-1] = True
    score = torch.where(protected, torch.full_like(score, math.inf), score)
    k = max(k, int(protected.sum()))
    kept = torch.zeros(length, dtype=torch.bool, device=x.device)
    kept[torch.argsort(score, descending=True, stable=True)[:k]] = True
    keep_idx = kept.nonzero().flatten()
    new_index = torch.cumsum(kept, 0) - 1
    dest = new_index.clone()
    if k < length:
        unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        nearest = (unit[~kept] @ unit[keep_idx].T).argmax(dim=-1)
        dest[~kept] = nearest
    return x[keep_idx], sizes[keep_idx], keep_idx, dest


def _per_sequence(fn, x, sizes, per_token, bi, si, batch, *params):
    """Apply a per-sequence token op (_merge_sequence, _prune_sequence) to packed tokens;
    `per_token` ([1, N, …], [N] or None) is sliced per sequence like x."""
    if sizes is None:
        sizes = x.new_ones(x.shape[1])
    if per_token is not None and per_token.dim() > 1:
        per_token = per_token[0]
    xs, ss, bs, ps, dests, offset = [], [], [], [], [], 0
    for b, start, end in _sequence_bounds(bi, batch):
        extra = None if per_token is None else per_token[start:end]
        out, size, keep, dest = fn(x[0, start:end], sizes[start:end], extra, *params)
        xs.append(out)
        ss.append(size)
        bs.append(bi[start:end][keep])
        ps.append(si[start:end][keep])
        dests.append(dest + offset)
        offset += out.shape[0]
    if not xs:
        return x.clone(), sizes.clone(), bi.clone(), si.clone(), torch.arange(x.shape[1], device=x.device)
    return (torch.cat(xs)[None], torch.cat(ss), torch.cat(bs), torch.cat(ps), torch.cat(dests))


def _token_prune(x: torch.Tensor, sizes: Optional[torch.Tensor], bi: torch.Tensor, si: torch.Tensor, batch: int,
                 keep: float, protect_first: bool, protect_last: bool, score: Optional[torch.Tensor] = None):
    """Pruning of each sequence of packed tokens x [1, N, D] by `score` [N] (attention_score's),
    or by norm without one (see _prune_sequence); returns as token_merge does."""
    return _per_sequence(_prune_sequence, x, sizes, score, bi, si, batch, keep, protect_first, protect_last)


def _slots(bi: torch.Tensor, batch: int, right: bool) -> tuple[torch.Tensor, int]:
    """Where each packed token goes in a [batch, L] grid of the sequences' remaining tokens, L the
    longest: in order from slot 0, or ending at slot L − 1 with `right` (left padding, as decoders
    want the last token last). Returns (flat slot b·L + j per token, L)."""
    counts = torch.bincount(bi, minlength=batch)
    length = int(counts.max()) if bi.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(bi.numel(), device=bi.device) - starts[bi]
    if right:
        local = local + (length - counts)[bi]
    return bi * length + local, length


def _repad_tokens(x: torch.Tensor, bi: torch.Tensor, batch: int, batch_dim: int, seq_dim: int,
                  right: bool) -> torch.Tensor:
    """Packed x ([1, N, …] with batch/seq at batch_dim/seq_dim) -> [B, L, …]: each sequence's
    remaining tokens in order, zeros after them (before them with `right`)."""
    slots, length = _slots(bi, batch, right)
    moved = x.movedim((batch_dim, seq_dim), (0, 1))[0]  # [N, rest…]
    out = moved.new_zeros((batch * length, *moved.shape[1:])).index_copy(0, slots, moved)
    return out.view(batch, length, *moved.shape[1:]).movedim((0, 1), (batch_dim, seq_dim)).contiguous()


def _repad_tokens_fake(x, bi, batch, batch_dim, seq_dim, right):
    shape = list(x.shape)
    shape[batch_dim], shape[seq_dim] = batch, torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(shape)


def _kept_tokens(bi: torch.Tensor, si: torch.Tensor, sizes: Optional[torch.Tensor], batch: int,
                 right: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of _repad_tokens' outputs described: (positions [B, L], each slot's original position
    or −1 at padding; sizes [B, L], the input tokens each slot holds, 0 at padding)."""
    slots, length = _slots(bi, batch, right)
    positions = torch.full((batch * length,), -1, dtype=torch.long, device=bi.device).index_copy(0, slots, si)
    held = torch.ones(bi.numel(), device=bi.device) if sizes is None else sizes.float()
    counts = torch.zeros(batch * length, device=bi.device).index_copy(0, slots, held)
    return positions.view(batch, length), counts.view(batch, length)


def _kept_tokens_fake(bi, si, sizes, batch, right):
    length = torch.library.get_ctx().new_dynamic_size()
    return bi.new_empty((batch, length)), bi.new_empty((batch, length), dtype=torch.float32)


def _token_merge_fake(x, sizes, bi, si, batch, *params):
    n = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((1, n, *x.shape[2:])), x.new_empty((n,)), bi.new_empty((n,)), si.new_empty((n,)),
            bi.new_empty(bi.shape))


_OPS = {
    "token_index": ("(Tensor mask) -> (Tensor, Tensor)", _token_index, _token_index_fake),
    "pack_tokens": ("(Tensor x, Tensor batch_index, Tensor seq_index, SymInt seq, int batch_dim, int seq_dim) -> Tensor",
                    _pack, _pack_fake),
    "unpack_tokens": ("(Tensor x, Tensor batch_index, Tensor seq_index, SymInt batch, SymInt seq, "
                      "int batch_dim, int seq_dim) -> Tensor", _unpack, _unpack_fake),
    "packed_attention": ("(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor batch_index, Tensor seq_index, "
                         "SymInt batch, float? scale, bool is_causal, bool enable_gqa, Tensor? sizes=None) -> Tensor",
                         _packed_attention, _packed_attention_fake),
    "token_merge": ("(Tensor x, Tensor? sizes, Tensor batch_index, Tensor seq_index, SymInt batch, float ratio, "
                    "bool protect_first, Tensor? metric=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                    _token_merge, _token_merge_fake),
    "token_prune": ("(Tensor x, Tensor? sizes, Tensor batch_index, Tensor seq_index, SymInt batch, float keep, "
                    "bool protect_first, bool protect_last, Tensor? score=None) -> (Tensor, Tensor, Tensor, Tensor, "
                    "Tensor)", _token_prune, _token_merge_fake),
    "repad_tokens": ("(Tensor x, Tensor batch_index, SymInt batch, int batch_dim, int seq_dim, bool right) -> Tensor",
                     _repad_tokens, _repad_tokens_fake),
    "kept_tokens": ("(Tensor batch_index, Tensor seq_index, Tensor? sizes, SymInt batch, bool right) -> "
                    "(Tensor, Tensor)", _kept_tokens, _kept_tokens_fake),
    "attention_score": ("(Tensor q, Tensor k, Tensor? mask, Tensor batch_index, Tensor seq_index, SymInt batch, "
                        "float? scale, bool is_causal, bool enable_gqa, bool received, Tensor? sizes=None) -> Tensor",
                        _attention_score, _attention_score_fake),
}


def _register() -> None:
    for name, (schema, impl, fake) in _OPS.items():
        if not hasattr(torch.ops.slimfx, name):  # a re-import keeps the first registration
            op = torch.library.custom_op(f"slimfx::{name}", impl, mutates_args=(), schema=schema)
            op.register_fake(fake)


_register()


def token_ops_in(gm) -> list[str]:
    """The token ops (`slimfx::pack_tokens`, …) `gm`'s graph calls that values flow through:
    inference only, none has a gradient, so nothing trains or takes gradients through a graph
    that holds one. (token_index and kept_tokens read only the mask and positions.)"""
    ops = {getattr(torch.ops.slimfx, name).default: name for name in _OPS if name not in ("token_index", "kept_tokens")}
    return [f"slimfx::{ops[n.target]}" for n in gm.graph.nodes if n.target in ops]


token_index = torch.ops.slimfx.token_index.default
pack_tokens = torch.ops.slimfx.pack_tokens.default
unpack_tokens = torch.ops.slimfx.unpack_tokens.default
packed_attention = torch.ops.slimfx.packed_attention.default
token_merge = torch.ops.slimfx.token_merge.default
token_prune = torch.ops.slimfx.token_prune.default
attention_score = torch.ops.slimfx.attention_score.default
repad_tokens = torch.ops.slimfx.repad_tokens.default
kept_tokens = torch.ops.slimfx.kept_tokens.default
