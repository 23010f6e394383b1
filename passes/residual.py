"""Which residual-stream value a linear's output is added to, if any.

In a pre-norm block (Llama, GPT-2)

    h1 = h + o_proj(attention(norm(h)))        h2 = h1 + down_proj(act(gate(norm(h1))) * up(…))

o_proj's output goes straight into an add with the stream entering the block (h), and down_proj's
into one with h1. Such a linear can cancel, besides its own error, some of the drift the stream
itself carries at that point (passes/precision/compensate.py): it is the last weight before the
stream. The stream inside a block is its entering value (passes/graph.py's `Block.input`) and
every add that reads the stream, seen through casts and views; a linear whose output reaches an
add of the stream through casts and views only has that add's other operand as its partner. Every
other linear (q/k/v, gate/up, the post-norm BERT FFN's output, whose stream comes out of a norm)
has none.
"""
from __future__ import annotations

import torch
from torch import fx

from .graph import Block
from .rewrite import LinearSite

__all__ = ["block_stream", "residual_partner"]

aten = torch.ops.aten
# Ops that hand on their first input's values as the same stream (a dtype cast: the stream in
# another precision; views and reshapes; dropout, the identity at inference), in the forms
# torch.export leaves them.
_SAME_VALUES = {aten.to.dtype, aten._to_copy.default, aten.view.default, aten.reshape.default,
                aten._unsafe_view.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
                aten.dropout.default}
_ADDS = {aten.add.Tensor}


def block_stream(block: Block, order: dict[fx.Node, int]) -> frozenset[fx.Node]:
    """The block's residual-stream values (`order`: each node's position in the graph): its input,
    then in graph order every same-values op of one and every add reading one."""
    if block.input is None:
        return frozenset()
    stream = {block.input}
    for n in sorted(block.nodes, key=order.__getitem__):
        if n.op != "call_function":
            continue
        if n.target in _SAME_VALUES and n.args and n.args[0] in stream:
            stream.add(n)
        elif n.target in _ADDS and any(a in stream for a in n.args if isinstance(a, fx.Node)):
            stream.add(n)
    return frozenset(stream)


def residual_partner(site: LinearSite, stream: frozenset[fx.Node]) -> fx.Node | None:
    """The value of `stream` (`block_stream`) the linear's output (`site.node`) is added to, or None."""
    y = site.node
    while True:
        users = list(y.users)
        if len(users) != 1:
            return None
        (user,) = users
        if user.target in _SAME_VALUES and user.args[0] is y:
            y = user
            continue
        if user.target in _ADDS and len(user.args) == 2 and all(isinstance(a, fx.Node) for a in user.args):
            other = user.args[1] if user.args[0] is y else user.args[0]
            return other if other in stream and _same_shape(other, y) else None
        return None


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and tuple(va.shape) == tuple(vb.shape)
