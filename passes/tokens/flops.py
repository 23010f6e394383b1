"""Estimated forward FLOPs of the blocks on one batch, for the token rules' report.

Per block: 2 · tokens · (Σ in·out of its linears) for the linears, plus 4 · Σ_sequences L² · width
for attention (QKᵀ and AV; `width` = the query projection's output). Each block's attention says
which tokens it sees (one run of the graph on the batch): a plain attention every sequence at the
padded length, a `slimfx::packed_attention` each sequence's own tokens (its token index).
Norms, activations and the embedding/head are left out: the blocks' matmuls dominate.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from ..graph import ModelGraph
from ..lora import base_sites, site_dims
from ..token_attention import ATTENTION_OPS, SDPA

__all__ = ["attention_lengths", "block_flops"]


def attention_lengths(graph: ModelGraph, batch: dict) -> Optional[list[list[int]]]:
    """Per block, the token count of each sequence its attention sees (one run of the graph on
    the batch): the padded length for a plain attention, the sequence's own for one running per
    sequence. None when some block's attention is written out by hand."""
    nodes = [n for n in graph.module.graph.nodes if n.target in ATTENTION_OPS]
    if len(nodes) != len(graph.blocks):
        return None
    rec = _Recorder(graph.module, set(nodes))
    with torch.no_grad():
        rec.run(*[batch[i.name] for i in graph.inputs])
    return [rec.lengths[n] for n in nodes]


def block_flops(graph: ModelGraph, lengths: list[list[int]]) -> int:
    total = 0
    for block, seqs in zip(graph.blocks, lengths):
        # (out, in) from the traced call, not the module's parameters: a quantized linear holds
        # packed buffers (and at most its bias) where the weight was.
        dims = {t.path: site_dims(base_sites(graph, t)[0]) for t in graph.targets.values()
                if t.block == block.index and t.kind == "linear"}
        weights = sum(out * inp for out, inp in dims.values())
        q = [p for p in dims if graph.targets[p].role == "attn.q"]
        # the query projection's output, or for a fused one the residual width (its input)
        width = dims[q[0]][0] if q else next(iter(dims.values()))[1]
        total += 2 * sum(seqs) * weights + 4 * sum(n * n for n in seqs) * width
    return total


class _Recorder(fx.Interpreter):
    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes, self.lengths = nodes, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.nodes and n.target is SDPA:
            q = self.env[n.args[0]]
            self.lengths[n] = [q.shape[-2]] * q.shape[0]
        elif n in self.nodes:
            bi = self.env[n.args[4]]
            batch = int(self.env[n.args[6]] if isinstance(n.args[6], fx.Node) else n.args[6])
            counts = torch.bincount(bi, minlength=batch).tolist()
            self.lengths[n] = [c for c in counts if c]
        return out
