"""How check_policy compares a compiled model's output with the original's: the same structure
(type, keys, leaf shapes), then every real-token element within `atol + rtol·|original|`, or a
user metric. Padded positions of [batch, seq, …] outputs are never compared: which outputs are
per-token is said by `token_leaves` (one flag per output leaf, from the compiled graph's symbolic
shapes), or, where it is None, by shape alone."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

__all__ = ["structure_problem", "tolerance_problem", "token_leaves", "metric_result", "callable_name", "MetricReturnError"]



def _leaves(out) -> list[tuple[str, Any]]:
    flat, _ = pytree.tree_flatten_with_path(out)
    return [(_path(path), leaf) for path, leaf in flat]


def _path(path) -> str:
    """`logits`, `hidden_states[2]`, `[0]`: readable names for output leaves."""
    text = ""
    for entry in path:
        key = getattr(entry, "key", None)
        if isinstance(key, str):
            text += f".{key}" if text else key
        elif hasattr(entry, "name"):  # attribute keys
            text += f".{entry.name}" if text else entry.name
        else:
            text += f"[{getattr(entry, 'idx', key)!r}]"
    return text or "output"


def _signature(out) -> tuple[str, list[tuple[str, str]]]:
    # The dtype is part of a leaf's signature: a compiled fp16 model that returned float64 logits passed.
    leaves = [(path, f"tensor{list(leaf.shape)} {str(leaf.dtype).removeprefix('torch.')}"
               if isinstance(leaf, torch.Tensor) else repr(leaf)) for path, leaf in _leaves(out)]
    return type(out).__name__, leaves


def _without_shapes(leaves: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, "tensor " + v.rsplit(" ", 1)[1] if v.startswith("tensor[") else v) for k, v in leaves]


def structure_problem(orig, comp, *, shapes: bool = True) -> str | None:
    """How the compiled output's structure departs from the original's, or None. With
    `shapes=False` only the types and leaf names must agree: a metric compares what it needs of
    outputs whose sizes may differ (`tokens after … restore=false` returns fewer tokens)."""
    (ot, ol), (ct, cl) = _signature(orig), _signature(comp)
    if not shapes:
        ol, cl = _without_shapes(ol), _without_shapes(cl)
    problems = []
    if type(orig) is not type(comp):
        problems.append(f"type {ct}, original {ot}")
    ok, ck = dict(ol), dict(cl)
    if missing := [k for k in ok if k not in ck]:
        problems.append(f"missing {', '.join(missing)}")
    if extra := [k for k in ck if k not in ok]:
        problems.append(f"unexpected {', '.join(extra)}")
    problems += [f"{k} is {ck[k]}, original {ok[k]}" for k in ok if k in ck and ck[k] != ok[k]]
    if not problems and [k for k, _ in ol] != [k for k, _ in cl]:
        problems.append(f"leaf order {[k for k, _ in cl]}, original {[k for k, _ in ol]}")
    if not problems:
        return None
    return ("output structure differs: " + "; ".join(problems)
            + f"\n    original: {ot} {_leaf_list(ol)}\n    compiled: {ct} {_leaf_list(cl)}")


def _leaf_list(leaves) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in leaves) + "}"


def _real(leaf: torch.Tensor, mask: torch.Tensor | None, per_token: bool | None = None) -> torch.Tensor | None:
    """Bool tensor shaped like `leaf`, False at padded positions, for leaves shaped [batch, seq, …]
    (and per-token when `per_token` says); None when every element counts."""
    if mask is None or bool(mask.all()) or leaf.dim() < 2:
        return None
    keep = mask.to(device=leaf.device, dtype=torch.bool)
    if leaf.dim() == 4 and mask.dim() == 2 and leaf.shape[0] == mask.shape[0] and tuple(leaf.shape[2:]) == (mask.shape[1],) * 2:
        # an attention map [batch, heads, query, key]: a padded query's row is no token's (what a
        # model computes there is its own; `tokens unpad` computes none), its keys are masked out
        return keep[:, None, :, None].expand(leaf.shape)
    if tuple(leaf.shape[:2]) != tuple(mask.shape) or per_token is False:  # [batch, classes], classes == seq
        return None
    return keep.view(*keep.shape, *([1] * (leaf.dim() - 2))).expand(leaf.shape)


def _flags(token_leaves, n: int) -> list[bool | None]:
    return list(token_leaves) if token_leaves is not None and len(token_leaves) == n else [None] * n


def tolerance_problem(orig, comp, mask, rtol: float, atol: float,
                      token_leaves: tuple[bool, ...] | None = None) -> tuple[str | None, float]:
    """(a description of the worst leaf if any element is out of tolerance, max abs error)."""
    worst_err, report = 0.0, None
    worst_bad = -1.0
    leaves = _leaves(orig)
    for (path, o), (_, c), per_token in zip(leaves, _leaves(comp), _flags(token_leaves, len(leaves))):
        if not isinstance(o, torch.Tensor):
            if o != c:
                return f"{path}: {c!r}, original {o!r}", math.inf
            continue
        o64, c64 = o.detach().double().cpu(), c.detach().double().cpu()
        diff = (c64 - o64).abs()
        same = (torch.isnan(o64) & torch.isnan(c64)) | (o64 == c64)  # NaN==NaN, inf==inf
        # Anything else against a NaN or an inf is infinitely far (nan_to_num's default would turn
        # an inf difference into the largest float, and rtol·inf would allow it).
        diff = torch.where(same, torch.zeros_like(diff), torch.nan_to_num(diff, nan=math.inf, posinf=math.inf))
        allowed = atol + rtol * torch.where(torch.isfinite(o64), o64.abs(), torch.zeros_like(o64))
        keep = _real(o, mask, per_token)
        keep = keep.cpu() if keep is not None else torch.ones_like(diff, dtype=torch.bool)
        diff = torch.where(keep, diff, torch.zeros_like(diff))
        bad = (diff > allowed) & keep
        if diff.numel() == 0:
            continue
        err = float(diff.max())
        worst_err = max(worst_err, err)
        if not bool(bad.any()):
            continue
        excess = torch.where(bad, diff - allowed, torch.full_like(diff, -1.0))
        flat = int(excess.argmax())
        index = list(torch.unravel_index(torch.tensor(flat), diff.shape))
        index = [int(i) for i in index]
        at = tuple(index)
        where = (f"{path}: max |compiled - original| = {err:.4g}; worst at {index}: original "
                 f"{float(o64[at]):.6g}, compiled {float(c64[at]):.6g}, allowed {float(allowed[at]):.3g}; "
                 f"{int(bad.sum())} of {int(keep.sum())} compared elements out of tolerance")
        if float(excess.max()) > worst_bad:
            worst_bad, report = float(excess.max()), where
    return report, worst_err


def left_padding_hint(orig, token_leaves, problem: str) -> str:
    """Said when a left-padded draw fails on an output that is not per token: it is read at a fixed
    position (BERT's pooler reads position 0), a pad token there, whose value a `tokens unpad`
    model does not keep. A right-padding tokenizer never feeds the model such an input."""
    leaves = _leaves(orig)
    leaf = problem.split(":", 1)[0]
    if not any(path == leaf and flag is False for (path, _), flag in zip(leaves, _flags(token_leaves, len(leaves)))):
        return ""
    return (f"\n  hint: {leaf} is not per token and this input pads on the left: an output read at a fixed position "
            "(BERT's pooler reads position 0) reads a pad token there. If your tokenizer pads on the right, pass "
            "padding=\"right\"")


def _zero_padding(out, mask, token_leaves=None):
    flat, spec = pytree.tree_flatten(out)
    zeroed = []
    for leaf, per_token in zip(flat, _flags(token_leaves, len(flat))):
        keep = _real(leaf, mask, per_token) if isinstance(leaf, torch.Tensor) else None
        zeroed.append(leaf if keep is None else torch.where(keep, leaf, torch.zeros_like(leaf)))
    return pytree.tree_unflatten(zeroed, spec)


class MetricReturnError(TypeError):
    """A metric returned something that is neither a bool nor a number (README: a TypeError, the
    user's metric at fault, not a policy failure). check_policy adds the input it ran on."""


def metric_result(metric, orig, comp, mask, atol: float,
                  token_leaves: tuple[bool, ...] | None = None) -> tuple[str | None, float]:
    value = metric(_zero_padding(orig, mask, token_leaves), _zero_padding(comp, mask, token_leaves))
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if type(value).__name__ in ("bool", "bool_"):  # numpy's bool too
        ok = bool(value)
        return (None if ok else f"metric {callable_name(metric)} returned {value}"), (0.0 if ok else 1.0)
    if not isinstance(value, numbers.Real):
        # None used to read as False (a policy failure) and a string went to float() (a "raised"
        # message): either way the metric, not the policy, is wrong, and is said to be.
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise MetricReturnError(f"metric {callable_name(metric)} returned {type(value).__name__} ({shown})")
    value = float(value)
    if value <= atol:  # NaN fails
        return None, value
    return f"metric {callable_name(metric)} = {value:.6g}, allowed <= {atol:g}", value if value == value else math.inf


def callable_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def token_leaves(graph) -> tuple[bool, ...] | None:
    """Per output leaf: is it shaped [batch, seq, …] in the compiled graph's symbols (a per-token
    output, whose padded positions are not compared)? Shapes alone cannot say: [batch, classes]
    logits look per-token on a draw whose length equals the class count. None when a graph
    output has no recorded shape (the comparison then goes by shapes)."""
    batch = {str(i.shape[d]) for i in graph.inputs for d, role in i.dims.items() if role == "batch"}
    seq = {str(i.shape[d]) for i in graph.inputs for d, role in i.dims.items() if role == "seq"}
    out = next(n for n in reversed(graph.module.graph.nodes) if n.op == "output")
    tensors = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    leaves = graph.outputs.tensor_leaves  # a None the model returns is no tensor
    if sum(leaves) != len(tensors):
        return None
    flags, nodes = [], iter(tensors)
    for is_tensor in leaves:
        if not is_tensor:
            flags.append(False)
            continue
        node = next(nodes)
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        shape = [str(s) for s in val.shape]
        flags.append(len(shape) >= 2 and shape[0] in batch and shape[1] in seq)
    return tuple(flags)
