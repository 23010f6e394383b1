"""Whether a token rule finds what it needs in the model: `tokens unpad` an attention mask among
its inputs; `tokens after … prune|merge` an attention that runs per sequence
(scaled_dot_product_attention, which `tokens unpad` packs) after each place it removes tokens,
and, where it scores by attention or merges by keys, one in the block it reads. Bind checks them
so that `plan` refuses what the token pass would; core, as block_rules.py is."""
from __future__ import annotations

import torch

from ..runtime import token_ops
from .graph import Block, ModelGraph

__all__ = ["token_attention_problem", "unpad_mask_problem", "no_mask_hint", "MASK_INPUT", "SDPA", "ATTENTION_OPS"]

MASK_INPUT = "attention_mask"  # the input whose nonzeros are the real tokens

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# attention that runs per sequence: SDPA, which `tokens unpad` packs, and the packed form it becomes
ATTENTION_OPS = (SDPA, token_ops.packed_attention)
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
    if not any(n.target in ATTENTION_OPS and order[n] > order[last.output] for n in nodes):
        return (f"`tokens after … {action}` needs an attention that runs per sequence after {last.path}, and "
                f"the model has none there: {_HAND_WRITTEN}", _HINT)
    if reads_attention:
        for block in blocks:
            found = sum(n.target in ATTENTION_OPS for n in block.nodes)
            if found != 1:
                what = f"{found} such ops" if found else f"none ({_HAND_WRITTEN})"
                return (f"`tokens after … {action}` reads the attention of {block.path}, which must be one "
                        f"scaled_dot_product_attention; it has {what}",
                        "use `score=norm` (prune) or `by=hidden` (merge), which need no attention of the block")
    return None


def unpad_mask_problem(graph: ModelGraph) -> tuple[str, str] | None:
    """(message, hint) when the graph has no `attention_mask` input to find the real tokens by."""
    if any(i.name == MASK_INPUT for i in graph.inputs):
        return None
    return (f"`tokens unpad` finds the real tokens from the attention mask, and {graph.model_class} was captured "
            f"without an `{MASK_INPUT}` input", no_mask_hint(graph))


def no_mask_hint(graph: ModelGraph) -> str:
    """What to do depends on whether the model takes a mask at all, and under which name: the real
    tokens are read from the input named `attention_mask` (Hugging Face's name for it)."""
    others = [i.name for i in graph.inputs if "mask" in i.name]
    if others:
        return (f"the real tokens are read from the input named `{MASK_INPUT}`, and this model's mask is "
                f"`{others[0]}`: name that argument of forward `{MASK_INPUT}` (or wrap the model in a module "
                "whose forward does)")
    if not any(not i.dtype.is_floating_point and i.dims.get(1) == "seq" for i in graph.inputs):
        # pixels or features, not token ids: a ViT's forward may take a mask, yet no patch is padding
        return (f"{graph.model_class} takes no token ids, so its inputs have no padding to remove: leave "
                "`tokens unpad` out (`tokens … prune`/`merge` shorten its sequences without a mask)")
    return f"pass `{MASK_INPUT}` among the example inputs (a tokenizer's padded batch has it)"
