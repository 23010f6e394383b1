"""ModelGraph: the captured fx GraphModule plus an index of blocks, targets and roles.

capture() builds one; selectors (select.py) resolve against its index; every pass rewrites
`graph.module` and calls `graph.reindex()`; `graph.lint()` checks the invariants in README.md.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import torch
from torch import fx

from ..runtime.adapters import is_adapter_param
from ..runtime.program import CallInfo, InputInfo, ModuleInfo, OutputSpec, ParamInfo, Program
from . import roles
from .lent import Lent

__all__ = [
    "ModelGraph", "Target", "Block", "ModuleInfo", "ParamInfo", "InputInfo", "OutputSpec",
    "LintError", "innermost_module",
]


@dataclass(frozen=True)
class Target:
    """A linear, embedding, norm or conv module that rules can address."""

    path: str
    kind: str  # "linear" | "embedding" | "norm" | "conv"
    cls: str
    role: str | None  # "attn.q", "mlp.down", "norm", "embed", "head", … or None
    block: int | None  # index into graph.blocks, None outside the blocks
    params: tuple[str, ...]  # full parameter names ("….weight", "….bias")
    shapes: tuple[tuple[int, ...], ...]
    nbytes: int
    tied: tuple[str, ...] = ()  # params that alias a parameter of another module
    nodes: tuple[fx.Node, ...] = field(default=(), compare=False, repr=False)
    order: int = field(default=0, compare=False, repr=False)  # position of its first node

    @property
    def transposed(self) -> bool:
        """GPT-2's Conv1D stores its weight as [in, out]; nn.Linear as [out, in]."""
        return self.cls == "Conv1D"


@dataclass(frozen=True)
class Block:
    """One repeated transformer block and the residual stream through it."""

    index: int
    path: str  # "model.layers.3"
    cls: str
    input: fx.Node | None = field(compare=False)  # residual stream entering
    output: fx.Node | None = field(compare=False)  # residual stream leaving
    nodes: frozenset[fx.Node] = field(default=frozenset(), compare=False, repr=False)
    targets: tuple[str, ...] = field(default=(), repr=False)
    order: int = field(default=0, compare=False, repr=False)


class LintError(AssertionError):
    """A broken graph invariant: a bug in a pass, never in the user's policy."""


# ---- the graph -------------------------------------------------------------------------------


class ModelGraph(Program):
    """A captured model: `module` (an fx GraphModule over aten ops) and its index.

    >>> g = capture(llama, {"input_ids": ids, "attention_mask": mask})
    >>> g.blocks[0].path, g.by_role("attn.q")[0].path
    ('model.layers.0', 'model.layers.0.self_attn.q_proj')
    >>> type(g(input_ids=ids, attention_mask=mask)).__name__          # same output type
    'CausalLMOutputWithPast'
    """

    def __init__(self, module: fx.GraphModule, modules: dict[str, ModuleInfo],
                 inputs: tuple[InputInfo, ...], outputs: OutputSpec, model_class: str,
                 call: CallInfo | None = None):
        super().__init__(module, modules, inputs, outputs, model_class, call)
        self.lent: Lent | None = None  # set by capture(lend=True): tensors shared with the model
        self.reindex()
        # Does each block read the previous one's output (the residual stream passes through the
        # blocks)? Not where the model adds the residual outside them (`x = x + layer(x)` in the
        # parent's loop): rules that rewire the stream are refused there (bind.py), and lint
        # checks the chain only on a graph that had it.
        self.chain_break: str | None = chain_break(self.blocks)

    @classmethod
    def of(cls, program: Program) -> "ModelGraph":
        """The index over a Program (e.g. one loaded from an artifact); shares its module."""
        return cls(program.module, dict(program.modules), program.inputs, program.outputs,
                   program.model_class, program.call)

    # ---- the index ----
    def reindex(self) -> None:
        """Rebuild blocks and targets from the current graph (after a pass rewrote it)."""
        index = _Index(self.module, self.modules)
        self.node_order, self.module_nodes = index.order, index.module_nodes
        self.blocks_path, self.blocks, self.targets = index.blocks_path, index.blocks, index.targets

    def block_of(self, path: str) -> Block | None:
        """The block that module `path` lies in (the block itself included), or None."""
        return _block_of(path, self.blocks_path, self.blocks)

    def by_role(self, role: str, block: int | None = None) -> list[Target]:
        return [t for t in self.targets.values()
                if t.role == role and (block is None or t.block == block)]

    # ---- shapes ----
    def dim_symbols(self, role: str) -> frozenset[str]:
        """Symbol names of the dynamic dims with this role ("batch" or "seq") across inputs."""
        return frozenset(str(i.shape[d]) for i in self.inputs for d, r in i.dims.items()
                         if r == role and isinstance(i.shape[d], str))

    def seq_dim(self, node: fx.Node) -> int | None:
        """Which dim of `node`'s value is the sequence (a bare seq symbol), else None."""
        val, seq = node.meta.get("val"), self.dim_symbols("seq")
        for d, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt) and str(size.node.expr) in seq:
                return d
        return None

    # ---- analysis views ----
    def nx(self) -> nx.DiGraph:
        """The fx graph as a networkx DiGraph: nodes are fx node names, with attributes
        op, target, node (the fx.Node), module (innermost module path) and block."""
        g = nx.DiGraph()
        block_index = {n: b.index for b in self.blocks for n in b.nodes}
        for n in self.module.graph.nodes:
            g.add_node(n.name, op=n.op, target=n.target, node=n,
                       module=innermost_module(n, self.modules), block=block_index.get(n))
            g.add_edges_from((a.name, n.name) for a in n.all_input_nodes)
        return g

    def lint(self) -> None:
        """Raise LintError listing every broken invariant (passes/README.md)."""
        problems = [*_lint_nodes(self.module), *_lint_params(self.module), *_lint_index(self)]
        if problems:
            raise LintError(f"{self.model_class} graph breaks {len(problems)} invariant(s):\n  "
                            + "\n  ".join(problems))

    def __repr__(self) -> str:
        return (f"ModelGraph({self.model_class}, {len(self.blocks)} blocks at "
                f"{self.blocks_path!r}, {len(self.targets)} targets, "
                f"{len(self.module.graph.nodes)} nodes)")


# ---- the index -------------------------------------------------------------------------------


class _Index:
    """Blocks and targets computed from a GraphModule's nn_module_stack metadata."""

    def __init__(self, module: fx.GraphModule, modules: dict[str, ModuleInfo]):
        nodes = list(module.graph.nodes)
        self.modules = modules
        self.order = {n: i for i, n in enumerate(nodes)}
        self.module_nodes = _nodes_by_module(nodes, modules)
        compute = {p: len(ns) for p, ns in self.module_nodes.items()}
        self.blocks_path = roles.find_blocks(modules, compute)
        self.blocks = self._blocks()
        self.targets = self._targets()
        self.blocks = tuple(replace(b, targets=tuple(t.path for t in self.targets.values()
                                                     if t.block == b.index)) for b in self.blocks)

    def _blocks(self) -> tuple[Block, ...]:
        if self.blocks_path is None:
            return ()
        blocks: list[Block] = []
        for i, child in enumerate(self.modules[self.blocks_path].children):
            path = _join(self.blocks_path, child)
            members = frozenset(self.module_nodes.get(path, ()))
            prev = blocks[-1].output if blocks else None
            inp, out = _residual(members, self.order, prev)
            first = min((self.order[n] for n in members), default=0)
            blocks.append(Block(i, path, self.modules[path].cls, inp, out, members, order=first))
        return tuple(blocks)

    def _targets(self) -> dict[str, Target]:
        owners = _storage_owners(self.modules)
        found = []
        for path, info in self.modules.items():
            kind = roles.module_kind(info.classes)
            members = self.module_nodes.get(path)
            if kind is None or not members:
                continue  # not a target, or not used by the captured forward
            block = _block_of(path, self.blocks_path, self.blocks)
            role = roles.infer_role(path, kind, block.path if block else None)
            found.append(_target(info, kind, role, block, members, self.order, owners))
        found.sort(key=lambda t: t.order)
        if not any(t.role == "head" for t in found):  # an encoder's pooler is its head
            found = [replace(t, role="head") if t.role == "pooler" else t for t in found]
        if not any(t.role == "head" for t in found) and _unnamed_head(found):
            # a user's model names its head as it likes (`self.out`): the linear after every block,
            # last of all, is it (`keep head` was told the model had none)
            found[-1] = replace(found[-1], role="head")
        return {t.path: t for t in found}


def _unnamed_head(found: list[Target]) -> bool:
    """Is the last target in graph order an unnamed linear outside the blocks, after all of them?"""
    in_blocks = [t.order for t in found if t.block is not None]
    last = found[-1] if found else None
    # not inside another stack (`dec.1.c`, a second ModuleList the blocks are not): a head is one module
    return bool(in_blocks) and last is not None and last.kind == "linear" and last.block is None \
        and last.role is None and last.order > max(in_blocks) and not any(p.isdigit() for p in last.path.split("."))


def _block_of(path: str, blocks_path: str | None, blocks) -> Block | None:
    # blocks_path "" is a model that is its block list (a top-level nn.Sequential of blocks)
    prefix = f"{blocks_path}." if blocks_path else ""
    if blocks_path is None or not path.startswith(prefix):
        return None
    child = _join(blocks_path, path[len(prefix):].split(".")[0])
    return next((b for b in blocks if b.path == child), None)


# ---- index helpers ---------------------------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _stack_paths(node: fx.Node, modules: dict[str, ModuleInfo] | None) -> list[str]:
    """Module paths on the node's nn_module_stack, outermost first, normalized to dotted form
    (`layers[0]` -> `layers.0`) and filtered to real modules (export adds placeholder entries;
    None: unfiltered)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for entry in stack.values():
        path = entry[0] if isinstance(entry, tuple) else entry
        path = path.replace("[", ".").replace("]", "") if isinstance(path, str) else None
        if path and (modules is None or path in modules):
            paths.append(path)
    return paths


def innermost_module(node: fx.Node, modules: dict[str, ModuleInfo] | None = None) -> str | None:
    """The path of the innermost module `node` was captured in ('model.layers.1.mlp.down_proj')."""
    paths = _stack_paths(node, modules)
    return paths[-1] if paths else None


def _nodes_by_module(nodes: list[fx.Node], modules) -> dict[str, list[fx.Node]]:
    """module path -> nodes computed inside it (a module holds its submodules' nodes too)."""
    out: dict[str, list[fx.Node]] = defaultdict(list)
    for n in nodes:
        for path in _stack_paths(n, modules):
            out[path].append(n)
    return dict(out)


def _residual(members, order, prev_out):
    """(entering, leaving) residual-stream nodes of a block's node set.

    Leaving: the last floating-point value computed inside and used outside. Entering: the
    previous block's output if the block reads it, else an outside value of the same shape."""
    if not members:
        return None, None
    ordered = sorted(members, key=order.__getitem__)
    outs = [n for n in ordered if _is_float(n) and any(u not in members for u in n.users)]
    out = outs[-1] if outs else None
    ins = [a for n in ordered for a in n.all_input_nodes
           if a not in members and a.op != "get_attr" and _is_float(a)]
    if prev_out is not None and prev_out in ins:
        return prev_out, out
    same = [a for a in ins if out is not None and _shape(a) == _shape(out)]
    return (same or ins or [None])[0], out


def _is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() >= 2


def _shape(node: fx.Node) -> tuple[str, ...]:
    return tuple(str(s) for s in node.meta["val"].shape)


def _storage_owners(modules) -> dict[int, set[str]]:
    owners: dict[int, set[str]] = defaultdict(set)
    for path, info in modules.items():
        for p in info.params:
            owners[p.storage].add(path)
    return owners


def _target(info, kind, role, block, members, order, owners) -> Target:
    # A target's own parameters: an adapter's (lora_A, …) are trainable extras beside them.
    params = [p for p in info.params if not p.is_buffer and not is_adapter_param(p.name)]
    tied = tuple(p.name for p in params if len(owners[p.storage]) > 1)
    return Target(
        path=info.path, kind=kind, cls=info.cls, role=role,
        block=block.index if block else None,
        params=tuple(p.name for p in params), shapes=tuple(p.shape for p in params),
        nbytes=sum(p.nbytes for p in params), tied=tied,
        nodes=tuple(sorted(members, key=order.__getitem__)),
        order=min(order[n] for n in members))



# ---- lint ------------------------------------------------------------------------------------


def _lint_nodes(gm: fx.GraphModule) -> list[str]:
    """fx's own checks, then: every placeholder, call_function and tensor get_attr has
    meta["val"], and every get_attr resolves."""
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises RuntimeError/AssertionError with the node named
        return [f"fx graph lint: {e}"]
    problems = []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                value = _get_attr(gm, n.target)
            except AttributeError:
                problems.append(f"{n.format_node()}: no attribute {n.target!r} on the module")
                continue
            if isinstance(value, torch.Tensor) and "val" not in n.meta:
                problems.append(f"{n.format_node()}: get_attr of a tensor without meta['val']")
        elif n.op in ("placeholder", "call_function") and "val" not in n.meta:
            problems.append(f"{n.format_node()}: no meta['val']")
    return problems


def _lint_params(gm: fx.GraphModule) -> list[str]:
    """No dangling params: every parameter/buffer is read by some get_attr (aliases count)."""
    used = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                used.add(id(_get_attr(gm, n.target)))
            except AttributeError:
                pass  # reported by _lint_nodes
    owned = [*gm.named_parameters(remove_duplicate=False),
             *gm.named_buffers(remove_duplicate=False)]
    return [f"parameter {name!r} is not read by any get_attr node (dangling)"
            for name, t in owned if id(t) not in used]


def _lint_index(g: "ModelGraph") -> list[str]:
    """The stored index equals a fresh one, blocks chain through the residual stream, and every
    target's parameters exist."""
    fresh = _Index(g.module, g.modules)
    problems = []
    if [(b.path, b.nodes) for b in fresh.blocks] != [(b.path, b.nodes) for b in g.blocks]:
        problems.append("block index is stale: call graph.reindex() after rewriting")
    if list(fresh.targets) != list(g.targets):
        problems.append("target index is stale: call graph.reindex() after rewriting")
    if [b.index for b in g.blocks] != list(range(len(g.blocks))):
        problems.append(f"block indices are not 0..{len(g.blocks) - 1}")
    if getattr(g, "chain_break", None) is None and (broken := chain_break(g.blocks)) is not None:
        problems.append(broken)
    for t in g.targets.values():
        problems += [f"target {t.path}: parameter {p!r} missing from the graph module"
                     for p in t.params if not _has_attr(g.module, p)]
    return problems


def chain_break(blocks) -> str | None:
    """The first block that does not read the previous block's output as its residual input."""
    for a, b in zip(blocks, blocks[1:]):
        if b.input is not a.output:
            return (f"block {b.index} ({b.path}) reads {b.input} as its residual input, "
                    f"not block {a.index}'s output {a.output}")
    return None


def _get_attr(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _has_attr(module: torch.nn.Module, target: str) -> bool:
    try:
        _get_attr(module, target)
    except AttributeError:
        return False
    return True
