"""An independent copy of a Program: the same graph and module table over cloned tensors.

It goes through the artifact's own encoding (runtime/graph_io.py) in memory, so the copy is
exactly what save + load would give (fresh fake values, reference ops, no kernel layouts), and
nothing the copy does — a merge, another compile — can touch the original.
"""
from __future__ import annotations

import json
from dataclasses import replace

import torch

from .graph_io import decode_graph, encode_graph
from .lower import unlowered
from .program import InputInfo, Program, input_shape

__all__ = ["copy_program"]


def copy_program(program: Program) -> Program:
    with unlowered(program.module):
        doc, tensors, _ = encode_graph(program.module, program.model_class)
    doc = json.loads(json.dumps(doc))  # exactly what a load reads: no shared Python objects either
    module = decode_graph(doc, {k: v.detach().clone() for k, v in tensors.items()})
    return Program(module, dict(program.modules), _inputs_of(module, program.inputs), program.outputs,
                   program.model_class, program.call)


def _inputs_of(module, inputs: tuple[InputInfo, ...]) -> tuple[InputInfo, ...]:
    """The inputs with the shapes the copy's own placeholders have: decoding makes fresh symbols
    (s45 where the capture had s72), and the passes find the batch and sequence dims by these
    names (a token rule compiled onto a CompiledModel found none). As artifact.py's load does."""
    values = {n.target: n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"}
    return tuple(replace(i, shape=input_shape(values[i.name])) if isinstance(values.get(i.name), torch.Tensor) else i
                 for i in inputs)
