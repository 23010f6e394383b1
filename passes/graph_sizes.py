"""What a graph weighs: its bytes (each storage once) and its weights (each counted once, the
ones the passes store as buffers included). The plan's totals and every pass's report use them."""
from __future__ import annotations

from .block_reads import HEAL_MAP
from .graph import ModelGraph

__all__ = ["graph_bytes", "graph_params"]


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
