"""Lowering a rewritten graph to generated Triton kernels: every fusion group a template emits is
replaced by one call of its kernel.

`lower_graph(graph)` returns a *new* graph (the reference graph is left as it is: saving keeps
that one, and `slimfx.load(dir, backend="triton")` lowers it again, regenerating every source from
the graph) together with a `CodegenSummary`. In the new graph each emitted group is a single
`call_function` node whose target is the kernel's launcher, followed by one `getitem` per output;
its nodes are gone. Groups no template expresses stay eager ops, counted with their reasons.

The launchers run inference only: generated kernels have no backward. A CompiledModel call that
needs a gradient runs its reference graph instead (runtime/compiled.py); a launcher reached with
one anyway (the lowered graph called directly) raises, saying to use `backend="eager"`.
"""
from __future__ import annotations

import collections
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from .emit import emit_all
from .kernel import Kernel
from .partition import Group, check_acyclic, partition

__all__ = ["CodegenSummary", "lower_graph", "launcher", "drop_metadata_asserts"]


@dataclass(frozen=True)
class CodegenSummary:
    by_template: tuple[tuple[str, int], ...] = ()  # (template, group calls in the lowered graph)
    eager: tuple[tuple[str, int], ...] = ()  # (reason, groups) left to eager ops
    listings: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (kernel name, listing) per source

    @property
    def kernels(self) -> int:
        return sum(n for _, n in self.by_template)

    @property
    def sources(self) -> int:
        """Distinct kernel sources (one Triton compilation each)."""
        return len(self.listings)

    def __str__(self) -> str:
        made = ", ".join(f"{n} {t}" for t, n in self.by_template) or "none"
        text = f"{self.kernels} generated kernel calls ({made}; {self.sources} distinct sources)"
        left = sum(n for _, n in self.eager)
        if left:
            text += f"; {left} group{'s' * (left != 1)} left to eager ops"
        return text

    def eager_reasons(self) -> str:
        return "\n".join(f"  {n} × {why}" for why, n in self.eager)


def launcher(kernel: Kernel) -> Callable:
    """The function a lowered node calls: the kernel on the node's inputs, the outputs as a tuple."""

    def launch(*values):
        if torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in values):
            raise RuntimeError(
                "generated Triton kernels have no backward; train with backend=\"eager\" "
                "(cm.set_backend(\"eager\")) and switch back for inference")
        return tuple(kernel.launch(values))

    launch.__name__ = launch.__qualname__ = kernel.name
    launch.kernel = kernel
    return launch


def lower_graph(graph: fx.Graph) -> tuple[fx.Graph, CodegenSummary]:
    """A copy of `graph` with every group a template emits replaced by its kernel's call."""
    new = fx.Graph()
    new._codegen = graph._codegen  # export's pytree calling convention (flat inputs in, structure out)
    remap: dict[fx.Node, fx.Node] = {}
    new.output(new.graph_copy(graph, remap))
    drop_metadata_asserts(new)
    groups = partition(new)
    emitted = emit_all(groups)
    check_acyclic(new, [_as_group(k) for k in emitted.kernels])
    order = {n: i for i, n in enumerate(new.nodes)}
    renamed: dict[fx.Node, fx.Node] = {}  # a group output -> the getitem that now stands for it
    for kernel in emitted.kernels:
        _replace(new, kernel, order, renamed)
    _legalize(new)
    new.lint()
    templates = collections.Counter(k.template for k in emitted.kernels)
    reasons = collections.Counter(why for _, why in emitted.eager)
    return new, CodegenSummary(tuple(sorted(templates.items())), tuple(reasons.most_common()),
                               _listings(emitted.kernels))


def drop_metadata_asserts(graph: fx.Graph) -> None:
    """Erase export's `aten._assert_tensor_metadata` checks (one beside each `.to()` of the
    model). Each reads a value that is usually inside a fusion group — in a Llama, the float32
    hidden state an RMSNorm casts — and a value read outside its group is written out: every
    norm's kernel wrote a second [rows, D] float32 tensor that only the check read, twice the
    norm's useful traffic in bfloat16. The checks assert dtypes and shapes the capture already
    fixed; a kernel refuses an input of another dtype at launch (Kernel.check_dtypes), and the
    reference graph that eager runs and save() keeps is left with them. The traffic model
    (traffic.py) partitions the graph without them too, as the kernels run."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _METADATA_ASSERT and not node.users:
            graph.erase_node(node)


_METADATA_ASSERT = torch.ops.aten._assert_tensor_metadata.default


def _listings(kernels: list[Kernel]) -> tuple[tuple[str, str], ...]:
    """(name, text) per distinct source: the source under a header naming every group it replaces."""
    by_name: dict[str, list[Kernel]] = {}
    for k in kernels:
        by_name.setdefault(k.name, []).append(k)
    return tuple((name, same[0].listing(same)) for name, same in by_name.items())


def _as_group(kernel: Kernel) -> Group:
    return Group("opaque", list(kernel.nodes))


def _replace(graph: fx.Graph, kernel: Kernel, order: dict, renamed: dict) -> None:
    """One call node (after the group's last node; _legalize moves it if an input comes later)
    and a getitem per output; the group's nodes erased."""
    inside = set(kernel.nodes)
    last = max(kernel.nodes, key=order.__getitem__)
    with graph.inserting_after(last):
        call = graph.call_function(launcher(kernel), tuple(renamed.get(n, n) for n, _ in kernel.inputs))
    call.meta["val"] = tuple(n.meta.get("val") for n, _ in kernel.outputs)
    where = call
    for i, (node, _) in enumerate(kernel.outputs):
        with graph.inserting_after(where):
            where = graph.call_function(operator.getitem, (call, i))
        where.meta = dict(node.meta)
        node.replace_all_uses_with(where, delete_user_cb=lambda user: user not in inside)
        renamed[node] = where
    for node in sorted(kernel.nodes, key=order.__getitem__, reverse=True):
        if node.users:
            raise AssertionError(f"{node.name} is still read after its group was lowered: {list(node.users)}")
        graph.erase_node(node)


def _legalize(graph: fx.Graph) -> None:
    """Reorder nodes topologically when a call landed after a reader of one of its outputs (a
    group whose last input comes late), keeping the original order otherwise."""
    seen, misplaced = set(), False
    for node in graph.nodes:
        if any(a not in seen for a in node.all_input_nodes):
            misplaced = True
            break
        seen.add(node)
    if not misplaced:
        return
    position = {n: i for i, n in enumerate(graph.nodes)}
    placed: set[fx.Node] = set()
    ordered: list[fx.Node] = []

    def place(node: fx.Node) -> None:
        stack = [(node, False)]
        while stack:
            n, ready = stack.pop()
            if n in placed:
                continue
            if ready:
                placed.add(n)
                ordered.append(n)
                continue
            stack.append((n, True))
            for a in sorted(n.all_input_nodes, key=position.__getitem__, reverse=True):
                if a not in placed:
                    stack.append((a, False))

    for node in list(graph.nodes):
        place(node)
    cursor = next(iter(graph.nodes))
    for node in ordered[1:] if ordered[0] is cursor else ordered:
        cursor.append(node)
        cursor = node
