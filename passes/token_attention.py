"""Whether a `tokens after … prune|merge` rule finds the attention it needs: an attention that
runs per sequence (scaled_dot_product_attention, which `tokens unpad` packs) after each place it
removes tokens, and, where it scores by attention or merges by keys, one in the block it reads.
Bind checks it so that `plan` refuses what the token pass would; core, as block_rules.py is."""
from __future__ import annotations

import torch

from ..runtime import token_ops
from .graph import Block, ModelGraph

__all__ = ["token_attention_problem"]

_ATTENTION = (torch.ops.aten.scaled_dot_product_attention.default, token_ops.packed_attention)
_HAND_WRITTEN = ("attention written out by hand (eager attention, as Gemma 2's or "
                 "attn_implementation=\"eager\") stays padded")
_HINT = ("load the model with attn_implementation=\"sdpa\" where its architecture has it, or choose "
         "blocks whose attention is scaled_dot_product_attention")


def token_attention_problem(graph: ModelGraph, blocks: tuple[Block, ...], action: str,
                            reads_attention: bool) -> tuple[str, str] | None:
    """(message, hint) when the rule cannot apply to `blocks` for want of such an attention."""
    if not blocks or any(b.output is None for b in blocks):
        return None
    nodes = list(graph.module.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    last = max(blocks, key=lambda b: order[b.output])
    if not any(n.target in _ATTENTION and order[n] > order[last.output] for n in nodes):
        return (f"`tokens after … {action}` needs an attention that runs per sequence after {last.path}, and "
                f"the model has none there: {_HAND_WRITTEN}", _HINT)
    if reads_attention:
        for block in blocks:
            found = sum(n.target in _ATTENTION for n in block.nodes)
            if found != 1:
                what = f"{found} such ops" if found else f"none ({_HAND_WRITTEN})"
                return (f"`tokens after … {action}` reads the attention of {block.path}, which must be one "
                        f"scaled_dot_product_attention; it has {what}",
                        "use `score=norm` (prune) or `by=hidden` (merge), which need no attention of the block")
    return None
