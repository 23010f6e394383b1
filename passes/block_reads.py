"""What a run of blocks hands on besides the residual stream: a run whose own values later nodes
read (T5's first block computes the position bias every later block adds) cannot be removed.
Core, because both bind (so `plan` refuses such a `drop`) and the collapse pass ask.
"""
from __future__ import annotations

import torch
from torch import fx

from ..runtime import token_ops
from .graph import Block, innermost_module

__all__ = ["read_after", "stream_between", "token_pack", "removal_problem", "heal_map_in", "is_heal_map", "HEAL_MAP",
           "runs_of", "shared_read", "step_left_last", "step_removed",
           "STEP_LEFT_LAST_HINT", "token_step_in", "auto_drop_problem"]


def stream_between(run: list[Block]) -> set[fx.Node]:
    """The residual stream between the run's blocks, read after the run: each block's hidden state
    when captured with output_hidden_states=True (the output tuple reads every block's output, and
    the stream entering it through a no-op `.to(float32)`). Where a removed block was, the hidden
    state is the stream that enters the run. Where the run ends in a `tokens` rule's pack, what the
    pack reads is the stream too (the pack's token count is read from it, after the run)."""
    packed = {pack.args[0] for pack in [token_pack(run[-1])] if pack is not None}
    return {b.output for b in run} | packed | {n for b in run for n in b.nodes if _same_value(n, b.input)}


def token_pack(last: Block) -> fx.Node | None:
    """The block's output when it is a `tokens` rule's pack of the stream (slimfx::pack_tokens: a
    `tokens after` with no `tokens unpad` above packs the stream entering its block, and the pack
    belongs to the block before, as its output): removing that block must keep the pack."""
    out = last.output
    if out is not None and out.target is token_ops.pack_tokens and out.args[0] in last.nodes:
        return out
    return None


def read_after(run: list[Block]) -> fx.Node | None:
    """A value computed inside the run that later nodes read, other than the residual stream."""
    members = frozenset().union(*(b.nodes for b in run))
    between = stream_between(run)
    return next((n for n in members if n not in between and any(u not in members for u in n.users)), None)


def runs_of(blocks: list[Block]) -> list[list[Block]]:
    """Blocks grouped into contiguous runs, in model order."""
    runs: list[list[Block]] = []
    for b in sorted(blocks, key=lambda b: b.index):
        if runs and runs[-1][-1].index + 1 == b.index:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def removal_problem(blocks: list[Block]) -> tuple[str, str] | None:
    """(message, hint) when removing `blocks` (each contiguous run of them) would take away a value
    later blocks read; else None."""
    for run in runs_of(blocks):
        shared = shared_read(run)
        if shared is not None:
            tensor, reader = shared
            return (f"{tensor.target} is one tensor shared by several blocks (a tied weight), held by a block "
                    f"this rule removes and read outside it too ({innermost_module(reader) or reader.name}): removing the block "
                    "would take that tensor away", "give each block its own copy of the weight before "
                    "compiling (e.g. `layer.mlp.down_proj.weight = nn.Parameter(w.clone())`), or remove "
                    "other blocks")
        mapped = next(((b, m) for b in run for m in [heal_map_in(b)] if m is not None), None)
        if mapped is not None:  # its node belongs to the block after the cut and went with it, silently
            block, weight = mapped
            return (f"{block.path} begins with the map an earlier `heal method=linear` put at its cut ({weight}): "
                    "removing the block would take that repair away with it",
                    f"remove other blocks, or compile the original model with {block.path} removed in the "
                    "policy that made the cut, above its `heal`")
        leak = read_after(run)
        if leak is not None:
            owner = next(b for b in run if leak in b.nodes)
            step = _token_step(frozenset().union(*(b.nodes for b in run)))
            if step is not None:
                return step_removed(owner.path, f"a `tokens after` rule above prunes or merges the tokens ({step})")
            if _returned(leak):  # output_attentions=True: every block's attention map is an output
                return (f"{owner.path} computes a value the model returns ({leak.name}: a per-block output such "
                        "as output_attentions=True gives): removing the block would take that output away",
                        "compile with example inputs that leave per-block outputs off (output_attentions=False)")
            return (f"{owner.path} computes a value the blocks after it read ({leak.name}, e.g. T5's position "
                    "bias, made in the first block only): removing it would leave them without it",
                    f"remove other blocks; an auto search never picks {owner.path}")
    return None


def step_removed(path: str, step: str) -> tuple[str, str]:
    """(message, hint) for removing the block `path` that a token `step` (in words) follows."""
    return (f"{path} is where {step}: removing it would take that step away from the blocks after it",
            f"remove {path} in a rule above the `tokens` rule (blocks are renumbered after it), or remove other blocks")


def heal_map_in(block: Block) -> str | None:
    """The tensor of a `heal method=linear` map whose node is in the block (collapse/heal.py puts
    it there, the block's first op: the map sits at the cut, in front of the block after it)."""
    return next((n.args[1].target for n in block.nodes if is_heal_map(n)), None)


def is_heal_map(node: fx.Node) -> bool:
    """`node` is a `heal method=linear` map: h @ T, a linear by a tensor of the blocks' container
    named heal_map…."""
    weight = node.args[1] if node.target is torch.ops.aten.linear.default and len(node.args) > 1 else None
    return isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.rpartition(".")[2].startswith(HEAL_MAP)


HEAL_MAP = "heal_map"  # the name of every map's tensor on the blocks' container starts so


STEP_LEFT_LAST_HINT = "remove other blocks, or put the `tokens after` step after an earlier block"


def step_left_last(blocks, removed) -> tuple[str, str] | None:
    """(message, hint) when removing `removed` of the model's `blocks` leaves a `tokens after` step
    of the graph after the last block that remains: it saves no work there and only changes the
    output tokens, which `tokens after <last block>` is refused for. Else None."""
    gone = {b.path for b in removed}
    remaining = [b for b in blocks if b.path not in gone]
    if not gone or not remaining or remaining[-1].path == blocks[-1].path or remaining[-1].output is None:
        return None
    last = remaining[-1]
    # From the stream entering it on: a compiled step's output is its block's output already.
    start = last.input if last.input is not None else last.output
    order = {n: i for i, n in enumerate(last.output.graph.nodes)}
    after = frozenset(n for n in last.output.graph.nodes if order[n] > order[start])
    step = _token_step(after)
    if step is None:
        return None
    return (f"removing {', '.join(sorted(gone))} leaves {last.path} the last block, with the `tokens after` step "
            f"({step}) after it: a step after the last block saves no work and only changes the output tokens",
            STEP_LEFT_LAST_HINT)


def token_step_in(graph) -> str | None:
    """The name of a `tokens after` step (prune or merge) the graph holds, if any."""
    return _token_step(frozenset(graph.module.graph.nodes))


def auto_drop_problem(what: str) -> tuple[str, str]:
    """(message, hint) for `drop … auto` on a model with a token step (`what` names it): its scores
    compare the stream entering and leaving each block on the same tokens (a raw size mismatch at
    the step's block)."""
    return (f"`drop … auto` scores each block by the residual stream entering and leaving it on the same tokens, "
            f"and {what} changes how many tokens there are",
            "drop blocks by index (`drop blocks[…]`), or put the auto drop above the `tokens` rule, compiling the "
            "original model")


def shared_read(run: list[Block]) -> tuple[fx.Node, fx.Node] | None:
    """(the read of a tensor a block of the run holds, a node outside the run that uses it): a
    weight tied across blocks is read under the name of one of them (export names it once), so
    removing that block took the tensor from the others; None if no such read."""
    members = frozenset().union(*(b.nodes for b in run))
    prefixes = tuple(b.path + "." for b in run)
    graph = next(iter(members)).graph
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith(prefixes):
            reader = next((u for u in node.users if u not in members), None)
            if reader is not None:
                return node, reader
    return None


def _returned(value: fx.Node) -> bool:
    """Is `value` one of the graph's outputs, directly or through ops that only reshape it?"""
    seen, todo = set(), [value]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user.op == "output":
                return True
            if user.op == "call_function" and len(user.all_input_nodes) == 1:
                todo.append(user)
    return False


# The ops a `tokens after` rule puts at the end of its block (runtime/token_ops.py).
_TOKEN_STEPS = ("slimfx::token_merge", "slimfx::token_prune")


def _token_step(members: frozenset) -> str | None:
    """The `tokens after` step inside a run (slimfx.token_merge / token_prune), by name: what later
    blocks read from the run is then the shorter token list, whichever of its values is found."""
    for node in members:
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.name in _TOKEN_STEPS:
            return schema.name.replace("::", ".")
    return None


_NO_OPS = (torch.ops.aten.to.dtype, torch.ops.aten.alias.default)


def _same_value(node: fx.Node, value: fx.Node | None) -> bool:
    """`node` is `value` itself through ops that change nothing (a cast to its own dtype)."""
    while value is not None and node is not value:
        if node.op != "call_function" or node.target not in _NO_OPS or not node.args:
            return False
        src = node.args[0]
        before, after = (n.meta.get("val") if isinstance(n, fx.Node) else None for n in (src, node))
        if not isinstance(src, fx.Node) or getattr(before, "dtype", None) != getattr(after, "dtype", 0):
            return False
        node = src
    return value is not None
