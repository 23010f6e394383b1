"""Calibration statistics for the precision pass: H = E[x xᵀ] of each target linear's input.

The graph (as earlier passes left it) runs on `ctx.calib` under an fx Interpreter that hands the
input of every watched linear site to a `HessianAccumulator`. Targets that read the same value
(q/k/v, gate/up) share one accumulator. Padding positions (attention_mask == 0) are left out.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .gptq import HessianAccumulator
from .graph import ModelGraph
from .quant_rewrite import LinearSite

__all__ = ["collect_hessians"]


def collect_hessians(graph: ModelGraph, sites: dict[str, list[LinearSite]],
                     batches: list[dict[str, Any]]) -> dict[str, HessianAccumulator]:
    """path -> accumulator of its linear's inputs over every calibration batch.

    >>> acc = collect_hessians(graph, {"model.layers.0.mlp.up_proj": sites}, [batch])  # doctest: +SKIP
    >>> acc["model.layers.0.mlp.up_proj"].H.shape
    torch.Size([64, 64])
    """
    by_input: dict[fx.Node, HessianAccumulator] = {}
    watched: dict[fx.Node, HessianAccumulator] = {}
    out = {}
    for path, path_sites in sites.items():
        for site in path_sites:
            acc = by_input.setdefault(site.x, out.get(path) or HessianAccumulator())
            out.setdefault(path, acc)
            watched[site.node] = acc
    names = [i.name for i in graph.inputs]
    for i, batch in enumerate(batches):
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(f"calibration batch {i} lacks inputs {missing}; the graph takes {names}")
        keep = _kept_rows(batch)
        with torch.no_grad():
            _Recorder(graph.module, watched, keep).run(*(batch[n] for n in names))
    return out


def _kept_rows(batch: dict[str, Any]) -> torch.Tensor | None:
    """Flattened attention mask (True = a real token), if the batch has one."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask.reshape(-1) != 0


class _Recorder(fx.Interpreter):
    """Runs the graph; feeds each watched site's input x to its accumulator."""

    def __init__(self, module: fx.GraphModule, watched: dict[fx.Node, HessianAccumulator],
                 keep: torch.Tensor | None):
        super().__init__(module)
        self.watched, self.keep = watched, keep

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        acc = self.watched.get(n)
        if acc is not None:
            x = self.env[_input_of(n)]
            rows = x.detach().reshape(-1, x.shape[-1])
            if self.keep is not None and self.keep.numel() == rows.shape[0]:
                rows = rows[self.keep.to(rows.device)]
            acc.add(rows)
        return result


def _input_of(n: fx.Node) -> fx.Node:
    # aten.linear(x, w, b) and mm(x, w): x first; addmm(b, x, w): x second.
    return n.args[1] if n.target == torch.ops.aten.addmm.default else n.args[0]
