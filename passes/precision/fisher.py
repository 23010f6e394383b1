"""`precision … by fisher`: each target's output error weighted by how much the model's loss feels
each of its outputs, so the solver's sum tracks the loss rather than raw layer-output MSE.

For a target with outputs y = W x, a weight error ΔW moves output o by (ΔW x)_o. To second order
the loss rises by ½ Σ_o F_o (ΔW x)_o² with F_o = E[(∂L/∂y_o)²] (the diagonal of the empirical
Fisher at that layer's outputs), assuming the error at an output and the gradient there are
independent. Its expectation over calibration tokens is Σ_o F_o (ΔW H ΔWᵀ)_oo with H = E[x xᵀ]:
`weighted_error` below. F comes from one forward and backward pass per calibration batch of the
graph as earlier rules left it, with the next-token cross entropy of a causal LM as L
(runtime/losses.py's `lm_loss`); a model without logits is refused at the rule.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import fx

from ...runtime.progress import Progress
from ...runtime.losses import NoTokenToPredict, lm_loss
from ...runtime.token_ids import token_ids_name
from ..calibrate import kept_rows, real_rows
from ..graph import ModelGraph

__all__ = ["output_fisher", "weighted_error", "FisherUnavailable", "NoFisherTokens"]


class FisherUnavailable(ValueError):
    """The graph cannot give loss gradients (no logits, or an op without a backward)."""


class NoFisherTokens(FisherUnavailable):
    """No calibration batch has a token to predict: the model could, the text cannot."""


def output_fisher(graph: ModelGraph, outputs: dict[str, list[fx.Node]], batches: list[dict[str, Any]],
                  progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """path -> F [out] (float64): the mean over calibration tokens of (∂L/∂y)², y the value of each
    of the target's output nodes (a target computed at several nodes sums their squares)."""
    names = [i.name for i in graph.inputs]
    ids = token_ids_name(graph)  # the lm loss scores the input an embedding reads, whatever its name
    watched = {n: path for path, nodes in outputs.items() for n in nodes}
    sums: dict[str, torch.Tensor] = {}
    tokens = skipped = 0
    with _params_need_grad(graph.module), (progress or Progress()).task(
            f"loss gradients for `by fisher` ({len(batches)} batches)", total=len(batches)) as step:
        for batch in batches:
            values: dict[fx.Node, torch.Tensor] = {}
            flat = _Keeper(graph.module, watched, values).run(*(batch[n] for n in names))
            try:
                loss = lm_loss(graph.restructure(flat), batch, ids)
            except NoTokenToPredict:  # one-token rows give no gradient: they refused the whole model
                skipped += 1
                step()
                continue
            except ValueError as e:  # less train()'s advice (loss='distill'): no precision rule takes it
                raise FisherUnavailable(str(e).partition(": use loss=")[0]) from None
            nodes = list(values)
            grads = torch.autograd.grad(loss, [values[n] for n in nodes], allow_unused=True)
            keep = kept_rows(batch)
            rows_seen = 0
            for node, g in zip(nodes, grads):
                if g is None:
                    continue
                rows = real_rows(g, keep).double()
                path = watched[node]
                sums[path] = sums.get(path, 0) + rows.pow(2).sum(0)
                rows_seen = rows.shape[0]  # the batch's real tokens, the same at every node
            tokens += rows_seen
            step()
    if skipped == len(batches):
        raise NoFisherTokens(f"none of the {len(batches)} calibration batches has a token to predict (every row "
                             "is padding or one token long)")
    missing = sorted(set(outputs) - set(sums))
    if missing:
        raise FisherUnavailable(f"the loss does not depend on {', '.join(missing[:3])}")
    return {p: s / tokens for p, s in sums.items()}


def weighted_error(d: torch.Tensor, H: torch.Tensor, fisher: torch.Tensor) -> float:
    """Σ_o F_o (d H dᵀ)_oo for a weight error d [out, in]."""
    per_output = ((d @ H) * d).sum(1, dtype=torch.float64)
    return float((per_output * fisher).sum())


class _Keeper(fx.Interpreter):
    """Runs the graph with autograd on, keeping the watched nodes' values."""

    def __init__(self, module: fx.GraphModule, watched: dict, values: dict):
        super().__init__(module)
        self.watched, self.values = watched, values

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.watched and isinstance(out, torch.Tensor) and out.requires_grad:
            self.values[n] = out
        return out


@contextmanager
def _params_need_grad(module: torch.nn.Module):
    """Float parameters require grad for the duration, so every activation is on the autograd
    graph (gradients are taken with autograd.grad, so no parameter's .grad is ever written)."""
    flipped = [p for p in module.parameters() if p.is_floating_point() and not p.requires_grad]
    try:
        for p in flipped:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in flipped:
            p.requires_grad_(False)
