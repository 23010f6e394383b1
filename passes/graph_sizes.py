"""What a graph weighs: its bytes (each storage once) and its weights (each counted once, the
ones the passes store as buffers included). The plan's totals and every pass's report use them."""
from __future__ import annotations

from .block_reads import HEAL_MAP
from .graph import ModelGraph

__all__ = ["attrs_read", "graph_bytes", "graph_params", "read_directly_note", "weights_read_directly"]


def graph_bytes(graph: ModelGraph) -> int:
    """Bytes of the graph's parameters and buffers, each storage counted once (tied weights)."""
    from ..runtime.sizes import param_bytes

    return param_bytes(graph.module)


def graph_params(graph: ModelGraph) -> int:
    """The model's weights, each counted once (tied ones): its parameters, and the weights the
    precision pass stores as buffers — a packed `qweight` as the out × in weights it holds, an
    fp16/bf16 `weight_fp16`/`weight_bf16` as its elements, and the d × d map `heal method=linear`
    stores as a `heal_map…` buffer. Scales and zero points are not weights.
    (Counting parameters alone made a quantized model's "params after" drop by its linears, and a
    healed model's count leave out the map its bytes include.)"""
    seen, total = set(), 0
    for p in graph.module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total + _stored_weights(graph)


def _stored_weights(graph: ModelGraph) -> int:
    import functools

    from ..runtime.ops import dequantize_op, quant_linear  # imported, the slimfx ops exist (plan() runs first)

    ops = {quant_linear.default: 1, dequantize_op.default: 0}
    counted: dict[str, int] = {}
    for node in graph.module.graph.nodes:
        if node.op == "call_function" and node.target in ops:
            qweight = node.args[ops[node.target]]  # a get_attr; its rows are the weight's rows
            rows = functools.reduce(getattr, qweight.target.split("."), graph.module).shape[0]
            counted[qweight.target] = rows * int(node.args[-1])  # in_features, the op's last argument
    for name, buffer in graph.module.named_buffers():
        if name.endswith((".weight_fp16", ".weight_bf16")):
            counted[name] = buffer.numel()
        elif name.rpartition(".")[2].startswith(HEAL_MAP):  # heal.py's fitted map: learned weights
            counted[name] = buffer.numel()
    return sum(counted.values())


def attrs_read(graph) -> set[str]:
    """The parameters and buffers the captured graph reads (a BlocksView: its captured graph's)."""
    return {n.target for n in getattr(graph, "source", graph).module.graph.nodes if n.op == "get_attr"}


def weights_read_directly(graph: ModelGraph, blocks: set[int]) -> tuple[list[str], int, int]:
    """(the weights in `blocks` that the forward reads itself rather than by calling their module,
    their bytes, all the blocks' weight bytes). No rule can select them: nn.MultiheadAttention's
    in_proj_weight and out_proj (F.multi_head_attention_forward reads both), a mixture of
    experts' 3-D expert tensors. A `quantize blocks.*.**` left them as they were, and said so nowhere."""
    prefixes = tuple(graph.blocks[i].path + "." for i in sorted(blocks))
    if not prefixes:
        return [], 0, 0
    owned = {name for t in graph.targets.values() for name in t.params}
    read = attrs_read(graph)
    names, direct, total = [], 0, 0
    for name, p in getattr(graph, "source", graph).module.named_parameters():
        if not name.startswith(prefixes):
            continue
        total += p.numel() * p.element_size()
        if name not in owned and name in read and p.is_floating_point() and p.dim() >= 2:
            names.append(name)
            direct += p.numel() * p.element_size()
    return names, direct, total


def read_directly_note(graph: ModelGraph, targets) -> str | None:
    """The plan's and report's note on a rule over `targets`: what the blocks they lie in hold
    that no rule can select (weights_read_directly), or None."""
    names, direct, total = weights_read_directly(graph, {t.block for t in targets if t.block is not None})
    if not names:
        return None
    shown = ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
    return (f"{direct / total:.0%} of these blocks' weight bytes are read by the forward itself, not by a module "
            f"call ({shown}): no rule can change them")
