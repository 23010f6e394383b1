"""Has this graph been given token rules before, in an earlier compile?

A CompiledModel compiled again (or one loaded) computes on packed tokens already, but its copied
graph keeps no record of which values are packed, nor of which gathers restore an output (meta
that the saved format does not hold): a second unpad would pack packed values, and a merge would
find no packed stream. Token rules above in the same policy do keep that record (the PACKED meta
their pass writes). Said by bind, so that `slimfx plan` says it, and by the token pass itself.
"""
from __future__ import annotations

from ..runtime import token_ops
from .graph import ModelGraph

__all__ = ["PACKED", "tokens_again_refusal", "no_gradients_problem"]

# Node meta of a value that holds packed tokens (passes/tokens/pack.py writes it).
PACKED = "slimfx_packed"


def tokens_again_refusal(graph: ModelGraph, rule_text: str) -> tuple[str, str] | None:
    """(message, hint) when `rule_text`, a token rule, would go on top of an earlier compile's."""
    ops = (token_ops.token_index, token_ops.token_merge, token_ops.token_prune)
    nodes = list(graph.module.graph.nodes)
    if not any(n.target in ops for n in nodes) or any(PACKED in n.meta for n in nodes):
        return None
    return (f"this {graph.model_class} was compiled before with token rules (it already computes on packed "
            f"tokens), and `{rule_text}` cannot be added on top of them",
            "compile the original model with all its token rules in one policy (`tokens unpad` and every "
            "`tokens after` rule); rules of other kinds (e.g. quantize) compile onto this one")


def no_gradients_problem(graph: ModelGraph, token_line: int | None, what: str) -> tuple[str, str] | None:
    """(message, hint) where a `tokens` rule above (on `token_line`), or an earlier compile's token
    rules, put ops without gradients in the model that `what` (a rule taking gradients: a LoRA heal,
    a Fisher budget) would run through; autograd's raw RuntimeError ended compile there."""
    if token_line is not None:
        return (f"{what} through the model, and the `tokens` rule on line {token_line} above it puts ops "
                "there that have no gradients", "put the `tokens` rules after it")
    ops = token_ops.token_ops_in(graph.module)
    if ops:
        return (f"{what} through the model, and an earlier compile's token rules put ops there that have no "
                f"gradients ({ops[0]}, …)", "write it into the policy that compiles the original model, "
                "above its `tokens` rules")
    return None
