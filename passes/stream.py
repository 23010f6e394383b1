"""Calibration batches advanced through the graph in graph order, all batches together, holding
only the values a node still to run reads: a sweep that stops at any node (a block's last, a
linear's input), lets observers see it, and goes on later — memory bounded by one cut through the
graph rather than by the model. The precision pass's sequential GPTQ (precision/sequential.py)
and `adapt … init=error` (adapters/error_init.py) sweep with it."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from .calibrate import kept_rows, real_rows
from .graph import ModelGraph

__all__ = ["Stream"]


class Stream:
    """Calibration batches advanced through the graph in graph order, all batches together."""

    def __init__(self, graph: ModelGraph, batches: list[dict[str, Any]]):
        self.module = graph.module
        names = [i.name for i in graph.inputs]
        placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        self.envs = [dict(zip(placeholders, (b[n] for n in names))) for b in batches]
        self.keeps = [kept_rows(b) for b in batches]
        self.done: set[fx.Node] = set(placeholders)  # computed (and perhaps dropped since)

    def run_through(self, last: fx.Node | None, watch: dict[fx.Node, list[Callable]],
                    pin: frozenset = frozenset()) -> None:
        """Compute every node up to `last` (graph order; None: up to the output) not computed yet;
        watched nodes' rows (real tokens only) go to their observers — also those of a watched
        node computed before and held now (a post-norm block's first linears read the previous
        block's last value: without this their Hessians saw no row); then drop the values no
        node still to run reads, except `pin` (what a second run of the same nodes reads again)."""
        todo = []
        for node in self.module.graph.nodes:
            if node.op == "output":
                break
            if node not in self.done:
                todo.append(node)
            if node is last:
                break
        held = [n for n in watch if n in self.done]  # todo holds only nodes not done yet
        for node in held:
            if any(node not in env for env in self.envs):
                raise KeyError(f"{node.name} is watched, but it was computed and dropped before this sweep")
        self.done.update(todo)
        for env, keep in zip(self.envs, self.keeps):
            runner = fx.Interpreter(self.module)
            runner.env = env
            for node in held:
                for fn in watch[node]:
                    fn(real_rows(env[node], keep))
            with torch.no_grad():
                for node in todo:
                    if node.op == "get_attr":
                        continue
                    # Weights are read afresh at each use, never held: _swapped puts new tensors
                    # in the module, and a held value would be the old one.
                    env.update((a, runner.fetch_attr(a.target)) for a in node.all_input_nodes
                               if a.op == "get_attr")
                    env[node] = runner.run_node(node)
                    for fn in watch.get(node, ()):
                        fn(real_rows(env[node], keep))
            for node in [n for n in env if n.op == "get_attr" or (
                    n.op != "placeholder" and n not in pin and n.users and all(u in self.done for u in n.users))]:
                del env[node]

    def nbytes(self) -> int:
        """Bytes of the values held now (every batch), counted once per tensor; the model's own
        parameters and buffers (get_attr values) are not copies and do not count."""
        seen = {id(v): v.nbytes for env in self.envs for n, v in env.items()
                if isinstance(v, torch.Tensor) and n.op != "get_attr"}
        return sum(seen.values())

    def rows(self, node: fx.Node) -> list[torch.Tensor]:
        """Each batch's real-token rows [tokens, features] of a value the stream holds now (computed,
        and read by a node still to run)."""
        if any(node not in env for env in self.envs):
            raise KeyError(f"the stream does not hold {node.name} now")
        return [real_rows(env[node], keep) for env, keep in zip(self.envs, self.keeps)]

    def forget(self, nodes: set[fx.Node]) -> None:
        """Drop these nodes' values, to compute them again (with other weights)."""
        self.done -= nodes
        for env in self.envs:
            for node in nodes & env.keys():
                del env[node]
