"""What a `heal` can do at its cuts — fold into a down projection, find linears to adapt, merge
them: checks and refusals bind (so that `plan` refuses what compile would) and the heal pass
share. Core, as block_rules.py is. heal_problem is bind's whole check of one heal rule."""
from __future__ import annotations

import torch
from torch import fx

from ..dsl import ast as A
from ..runtime.losses import lm_loss_problem
from .causal import causality
from .cut_gaps import gap_edges, heal_neighbours
from .graph import Block, ModelGraph
from .rewrite import find_sites, shared_outside

__all__ = ["heal_problem", "FOLD_HINT", "fold_block_problem", "fold_sum_problem", "fold_target_problem",
           "no_linear_problem", "merge_problem", "fold_tied_problem", "residual_sum", "through", "REFORMATTED",
           "EARLIER", "ADAPTED", "MAPPED"]

aten = torch.ops.aten
FOLD_HINT = "write fold=false (a map on the stream)"
# Ops that only view a tensor: GPT-2's Conv1D gives [B·S, D] rows viewed back to [B, S, D], and
# OPT's block returns its residual sum viewed so; their size operands are not tensors.
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def heal_problem(rule: A.Heal, whole: ModelGraph, view, protected: set[str], *, adapted: set[str],
                 reformatted: set[str], earlier: set[str], mapped: bool, all_cuts: bool = True
                 ) -> tuple[str, str, str] | None:
    """(kind, message, hint) when the heal `rule` cannot run on `view` (the model after the rules
    above it; None where an auto rule decides its blocks at compile) cut from `whole`: a LoRA
    heal's lm loss on a model without logits, no linear near the cuts to adapt or one it could
    not merge into; a fold at a cut with no pre-norm block before it, or into a weight `keep`
    protects, a rule above (`reformatted`) or an earlier compile (`earlier`) stored quantized or
    half, or adapted, or below a map (`mapped`). In the heal pass's order, so with its message.
    `all_cuts` false (bound again after a search, whose cuts `whole` no longer shows): the cuts
    seen are some of the heal's, so "no free linear near them" is no refusal."""
    if rule.get("method") == "lora" and not rule.get("distill"):
        problem = lm_loss_problem(whole)
        if problem is None and causality(whole) is False:  # it learns to copy the next token it sees
            problem = (f"its loss (distill=false) is next-token cross entropy, and {whole.model_class} is not causal: "
                       "each position reads the tokens after it")
        if problem is not None:
            return ("unsupported", f"`heal method=lora` cannot train here: {problem}",
                    "write distill=true to learn the original model's outputs")
    if view is None or not gap_edges(whole, view):
        return None
    if rule.get("method") == "lora":
        near = heal_neighbours(whole, view, rule.get("reach"))
        free = [t for t in near if t.path not in adapted]
        chosen = [t for t in free if t.path not in protected]
        if not chosen and all_cuts:
            blocks = [b.path for b in view.blocks if any(view.blocks[t.block] is b for t in near)]
            kept = sum(t.path in protected for t in free)
            return ("unsupported", *no_linear_problem(blocks, len(free) < len(near), kept))
        for stored, by_rule in ((reformatted, True), (earlier, False)):
            hit = [t.path for t in chosen if t.path in stored]
            if rule.get("merge") and hit:
                more = f" (and {len(hit) - 1} more)" if len(hit) > 1 else ""
                return merge_problem(f"the weight of {hit[0]}{more} is quantized or stored in another dtype by "
                                     + ("a rule above" if by_rule else "an earlier compile"), by_rule)
        return None
    if not rule.get("fold"):
        return None
    for before, _ in gap_edges(whole, view):
        problem = fold_block_problem(whole, before)
        if problem is not None:
            return ("unsupported", *problem)
        down = whole.by_role("mlp.down", before.index)[0]
        reason = REFORMATTED if down.path in reformatted else EARLIER if down.path in earlier else \
            ADAPTED if down.path in adapted else MAPPED if mapped else None
        problem = fold_target_problem(down.path, down.path in protected, reason) or \
            (("unsupported", *fold_tied_problem(down.path)) if shared_outside(whole, down, {down.path}) else None)
        if problem is not None:
            return problem
        problem = fold_sum_problem(whole, before, before.output)
        if problem is not None:
            return ("unsupported", *problem)
    return None


def fold_block_problem(graph: ModelGraph, before: Block | None) -> tuple[str, str] | None:
    """(message, hint) when the block before a cut (None: the gap starts at the first block) has
    no single down projection to fold into; else None."""
    downs = graph.by_role("mlp.down", before.index) if before is not None else []
    if before is None or len(downs) != 1:
        where = "the gap starts at the first block" if before is None else f"{before.path} has no single mlp.down"
        return (f"`heal … fold=true` folds into the down projection of the block before each cut, and {where}",
                FOLD_HINT)
    return None


def fold_sum_problem(graph: ModelGraph, before: Block, stream: fx.Node) -> tuple[str, str] | None:
    """(message, hint) when `stream`, what leaves `before`, is not the residual sum h + down(…) of
    its down projection (a post-norm block: the map would not reach the stream); else None."""
    site = find_sites(graph, graph.by_role("mlp.down", before.index)[0])[0]
    out = residual_sum(stream)
    if out.target is not aten.add.Tensor or not any(through(a, site.node) for a in out.args):
        return (f"`heal … fold=true` needs {before.path}'s output to be the residual sum h + down(…) (a pre-norm "
                "block); this model's is not", FOLD_HINT)
    return None


# Why the down projection before a cut takes no fold (the rule above it that decided so)
REFORMATTED = "an earlier rule stored that weight quantized or in another dtype"
EARLIER = "an earlier compile stored that weight quantized or in another dtype"
ADAPTED = "an adapter sits on it, which the fold would leave out"
MAPPED = "a `heal method=linear` above already put a map at this cut"


def fold_target_problem(down: str, kept: bool, reason: str | None) -> tuple[str, str, str] | None:
    """(kind, message, hint) when the down projection `down` cannot take the fold: a `keep`
    protects it, or `reason` (REFORMATTED, ADAPTED, MAPPED); else None."""
    if kept:
        return ("invalid-combination", f"`heal … fold=true` folds the map into {down}'s weight, and a `keep` rule "
                "protects it", f"narrow the `keep`, or {FOLD_HINT}")
    if reason == EARLIER:  # no rule of this policy to move
        return ("unsupported", f"`heal … fold=true` folds the map into {down}'s weight, and {reason}", FOLD_HINT)
    if reason is not None:
        return ("illegal-order", f"`heal … fold=true` folds the map into {down}'s weight, and {reason}",
                f"put this heal above that rule, or {FOLD_HINT}")
    return None


def fold_tied_problem(down: str) -> tuple[str, str]:
    """(message, hint) for a fold into a down projection another module shares (a tied weight)."""
    return (f"`heal … fold=true` folds the map into {down}'s weight, and another module shares that tensor "
            "(a tied weight): it would change there too",
            f"give each block its own copy of the weight before compiling, or {FOLD_HINT}")


def no_linear_problem(blocks: list[str], held: bool, kept: int) -> tuple[str, str]:
    """(message, hint) for a LoRA heal that finds no linear to adapt in the blocks near its cuts:
    `kept` of them protected by `keep`, `held` some carrying an earlier rule's adapters."""
    near = ", ".join(blocks)
    if kept:
        return ("`heal method=lora` found no linear in the blocks near the cuts "
                f"({near}) to put an adapter on: `keep` protects {kept} of them"
                + (" and the others carry adapters" if held else ""),
                "narrow the `keep`, give this heal a larger reach=, or use `heal method=linear`")
    if held:
        return ("`heal method=lora` found no linear without an adapter in the "
                f"blocks near the cuts ({near}): an earlier rule's adapters sit on them (an `adapt` "
                "rule, or a `heal method=lora merge=false`)", "let the earlier rule merge its adapters "
                "(merge=true), give this heal a larger reach=, or remove it")
    return (f"`heal method=lora` found no linear in the blocks near the cuts ({near}) to put an adapter on",
            "use `heal method=linear`")


def merge_problem(why: str, by_rule: bool = True) -> tuple[str, str, str]:
    """(kind, message, hint) for a LoRA heal whose adapters cannot be merged (`why`: a quantized
    weight, stored so by a rule above it, or else by an earlier compile: no rule here to move)."""
    message = f"`heal method=lora` cannot merge its adapters: {why}"
    if by_rule:
        return ("illegal-order", message, "write merge=false to keep them beside the quantized weights, or put "
                "the heal above the `quantize`")
    return ("unsupported", message, "write merge=false to keep them beside the quantized weights")


def residual_sum(out: fx.Node) -> fx.Node:
    """The block output `out` without the views around it."""
    while out.op == "call_function" and out.target in _VIEWS:
        out = out.args[0]
    return out


def through(arg, node: fx.Node) -> bool:
    """Is `arg` `node`, or reached from it through one-tensor-input ops (dropout, casts, clones,
    views)?"""
    while isinstance(arg, fx.Node):
        if arg is node:
            return True
        inputs = [n for n in arg.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        if arg.op != "call_function" or len(inputs) != 1:
            return False
        arg = inputs[0]
    return False
