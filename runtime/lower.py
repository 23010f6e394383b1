"""Lowering a compiled graph for the CPU, once, when a CompiledModel is built or loaded.

`lower(gm, "auto")` turns every `slimfx::quant_linear` node whose weight a CPU kernel takes
(runtime/cpu_kernels.py) into a call of that kernel's function, in place (the node object stays,
so an index of nodes stays valid): int4 and int2 → `cpu_kernels.quant_linear_int4pack`, per-channel
int8 → `cpu_kernels.quant_linear_int8pack` (the functions behind `slimfx::quant_linear_int4pack` /
`_int8pack`, called directly: see INT4PACK below). The reference op's arguments stay the node's first eight, and the
weights converted for the kernel are **non-persistent buffers** next to the packed ones
(`<path>.qweight_int4pack`, …): `.to(device)` moves them, `state_dict()` never holds them, and
`CompiledModel.weight_bytes()` leaves them out (`Lowering.extra_bytes` counts them).
`lower(gm, "triton")` replaces the graph by one whose fusion groups call generated Triton kernels
(codegen/lower.py; the reference graph is kept aside, and the weights are the same tensors). It
needs a CUDA GPU holding the weights, or Triton's interpreter (`TRITON_INTERPRET=1`, slow: for
tests and small models). "auto" is "triton" when the weights are on a GPU, the CPU kernels
otherwise.

`lower(gm, "eager")` (and `unlower`) puts the reference graph back; `unlowered(gm)` does so for
the length of a `with` block, keeping the converted tensors (or the lowered graph) to put back
after (saving uses it: an artifact holds the reference graph and the packed codes only; training
uses it under the Triton backend, whose kernels have no backward).

Runtime never imports the compiler (tests/test_layout.py): the code generator's `lower_graph` is
handed in with `register_graph_lowering("triton", …)`, which api.py does when it is imported — a
model from `slimfx.compile` or `slimfx.load(dir, backend="triton")` (which regenerates its kernels
from its stored graph) always has it.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import fx, nn

from . import cpu_kernels as K
from .ops import check_quant_linear
from .report import format_bytes
from .sizes import tensor_bytes
from .forward_parts import recompile
from .graph_access import writing

__all__ = ["BACKENDS", "Lowering", "lower", "unlower", "unlowered", "summary", "lowered_tensors",
           "register_graph_lowering", "BackendUnavailable", "check_triton_runs"]


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here (backend="triton" with no GPU and no interpreter)."""

BACKENDS = ("auto", "eager", "triton")
_TRITON = "__triton__"  # key of the lowered graph among the plans _strip returns
_GRAPH_LOWERINGS: dict = {}  # backend -> fn(graph) -> (lowered graph, summary), registered by the face


def register_graph_lowering(backend: str, fn) -> None:
    """`fn(fx.Graph) -> (fx.Graph, summary)` lowers a reference graph for `backend` (api.py
    registers codegen.lower.lower_graph for "triton")."""
    _GRAPH_LOWERINGS[backend] = fn


QUANT = torch.ops.slimfx.quant_linear.default
# The lowered nodes call the kernels' Python functions, the same ones registered as
# slimfx::quant_linear_int4pack / _int8pack: through the dispatcher a Python-implemented op costs
# ~45 µs more per call (measured), ~9 ms per token of SmolLM2's 210 linears. Never saved: save()
# un-lowers, so artifacts hold only torch.library ops.
INT4PACK = K.quant_linear_int4pack
INT8PACK = K.quant_linear_int8pack
_LOWERED = {INT4PACK: "int4pack", INT8PACK: "int8pack"}
_N_REF_ARGS = 8
_REF_ARG_NAMES = tuple(a.name for a in QUANT._schema.arguments)


@dataclass(frozen=True)
class Lowering:
    """How a compiled model's quantized linears run: `routes` holds (format, route, linear calls),
    e.g. ("int4", "int4pack", 210); route "reference" is `slimfx::quant_linear` itself."""

    routes: tuple[tuple[str, str, int], ...] = ()
    extra_bytes: int = 0  # converted weights held for the kernels, on top of weight_bytes()
    codegen: Optional[object] = None  # codegen.lower.CodegenSummary under the Triton backend

    def count(self, route: str) -> int:
        return sum(n for _, r, n in self.routes if r == route)

    @property
    def lowered(self) -> int:
        return sum(n for _, r, n in self.routes if r != "reference") + (self.codegen.kernels if self.codegen else 0)

    def __str__(self) -> str:
        if self.codegen is not None:
            left = [f"{n} {fmt} linear{'s' * (n != 1)} → reference op" for fmt, _, n in self.routes]
            return "; ".join([f"Triton backend: {self.codegen}", *left])
        if not self.routes:
            return "no quantized linears"
        parts = [f"{n} {fmt} linear{'s' * (n != 1)} → {_LABEL.get(r, r)}" for fmt, r, n in self.routes]
        if self.lowered:
            parts.append(f"activations pass through bf16 in the kernels; "
                         f"+{format_bytes(self.extra_bytes)} of converted weights")
        return "; ".join(parts)


_LABEL = {"int4pack": "CPU int4pack kernel", "int8pack": "CPU int8pack kernel",
          "reference": "reference op"}


# ---- reading the graph ------------------------------------------------------------------------------


def _fetch(gm: nn.Module, target: str):
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _ref_args(node: fx.Node) -> tuple:
    """The reference op's eight arguments of a quant_linear or lowered node, by position."""
    args = list(node.args[:_N_REF_ARGS])
    for name in _REF_ARG_NAMES[len(args):]:
        args.append(node.kwargs.get(name))
    return tuple(args)


def _quant_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    for node in gm.graph.nodes:
        if node.op == "call_function" and (node.target is QUANT or node.target in _LOWERED):
            yield node


def _fmt(node: fx.Node) -> str:
    return f"int{_ref_args(node)[5]}"


def summary(gm: fx.GraphModule) -> Lowering:
    """What runs where now, read from the graph."""
    counts: dict[tuple[str, str], int] = {}
    for node in _quant_nodes(gm):
        key = (_fmt(node), _LOWERED.get(node.target, "reference"))
        counts[key] = counts.get(key, 0) + 1
    extra = tensor_bytes(*{id(t): t for t in lowered_tensors(gm)}.values())
    triton = getattr(gm, "_slimfx_triton", None)
    return Lowering(tuple((f, r, n) for (f, r), n in sorted(counts.items())), extra,
                    None if triton is None else triton[1])


def lowered_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The converted weights the lowered nodes read (what weight_bytes leaves out)."""
    return [_fetch(gm, a.target) for node in _quant_nodes(gm) if node.target in _LOWERED
            for a in node.args[_N_REF_ARGS:] if isinstance(a, fx.Node) and a.op == "get_attr"]


# ---- choosing and converting ------------------------------------------------------------------------


def _plan(gm: fx.GraphModule, node: fx.Node):
    """(op, {suffix: tensor}, trailing ints) for a node a kernel takes, else None."""
    x, qweight, scales, zeros, _bias, bits, group, in_features = _ref_args(node)
    attrs = (qweight, scales) + (() if zeros is None else (zeros,))
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in attrs):
        return None
    qw, sc = _fetch(gm, qweight.target), _fetch(gm, scales.target)
    zr = None if zeros is None else _fetch(gm, zeros.target)
    if qw.device.type != "cpu" or qw.dim() != 2:
        return None
    # What the reference op would refuse, the kernels refuse too (an artifact whose group was
    # edited ran under `auto`, 0.09 off, and failed under eager): a ValueError load() reports.
    x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
    check_quant_linear(x_val if x_val is not None else torch.empty(0, in_features, device="meta"), qw, sc, zr,
                       bits, group, in_features)
    kernel_group = K.int4_kernel_group(bits, group, in_features, qw.shape[0])
    if kernel_group is not None:
        packed, sz = K.int4pack_weights(qw, sc, zr, bits, group, in_features, kernel_group)
        return INT4PACK, {"int4pack": packed, "int4pack_scales_zeros": sz}, (kernel_group,)
    if K.int8_eligible(bits, group, in_features):
        w8, s8, offsets = K.int8pack_weights(qw, sc, zr)
        tensors = {"int8pack": w8, "int8pack_scales": s8, "int8pack_offsets": offsets}
        return INT8PACK, tensors, ()
    return None


def _register(gm: fx.GraphModule, anchor: fx.Node, tensors: dict[str, Optional[torch.Tensor]]):
    """Non-persistent buffers `<anchor's path>_<suffix>` and get_attr nodes right after the anchor
    (the packed weight's own get_attr, so they come before every use). None stays None."""
    owner_path, _, leaf = anchor.target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    nodes: dict[str, Optional[fx.Node]] = {}
    fake = getattr(anchor.meta.get("val"), "fake_mode", None)
    where = anchor
    for suffix, t in tensors.items():
        if t is None:
            nodes[suffix] = None
            continue
        name = f"{leaf}_{suffix}"
        if name in owner._buffers:
            del owner._buffers[name]
        owner.register_buffer(name, t, persistent=False)
        with gm.graph.inserting_after(where):
            where = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
        if fake is not None:
            where.meta["val"] = fake.from_tensor(t, static_shapes=True)
        nodes[suffix] = where
    return nodes


def lower(gm: fx.GraphModule, backend: str = "auto", *,
          _converted: Optional[dict] = None) -> Lowering:
    """Lower `gm` in place for `backend` ("auto": the fastest route per linear; "eager": the
    reference ops only). Idempotent; switching backends re-lowers from the reference graph.
    Calls of other threads wait while it runs (runtime/graph_access.py)."""
    with writing(gm):
        return _lower(gm, backend, _converted)


def _lower(gm: fx.GraphModule, backend: str, _converted: Optional[dict]) -> Lowering:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "triton" and getattr(gm, "_slimfx_triton", None) is None:
        check_triton_runs(gm)  # before the current lowering goes: a refusal leaves the model as it was
    converted = dict(_converted or {})
    if getattr(gm, "_slimfx_triton", None) is not None or any(n.target in _LOWERED for n in _quant_nodes(gm)):
        converted.update(_strip(gm))
    if backend == "auto" and _on_gpu(gm):
        backend = "triton"
    if backend == "triton":
        _lower_triton(gm, converted.get(_TRITON))
    elif backend == "auto":
        changed, attrs_of = False, {}
        for node in list(_quant_nodes(gm)):
            key = _key(node)
            plan = converted.get(key) or _plan(gm, node)
            if plan is None:
                continue
            converted[key] = plan
            op, tensors, ints = plan
            anchor = _ref_args(node)[1]
            if key not in attrs_of:  # sites sharing a weight share its buffers
                attrs_of[key] = _register(gm, anchor, tensors)
            attrs = attrs_of[key]
            node.target = op
            node.args = (*_ref_args(node), *attrs.values(), *ints)
            node.kwargs = {}
            changed = True
        if changed:
            recompile(gm)
    return summary(gm)


def _on_gpu(gm: nn.Module) -> bool:
    return any(t.device.type == "cuda" for t in itertools.chain(gm.parameters(), gm.buffers()))


def _lower_triton(gm: fx.GraphModule, kept: Optional[tuple]) -> None:
    """Swap in the graph whose groups call generated kernels (`kept`: one lowered before)."""
    if kept is None:
        check_triton_runs(gm)
        if "triton" not in _GRAPH_LOWERINGS:
            raise RuntimeError("the Triton backend needs slimfx's code generator: get the model from "
                               "slimfx.compile(...) or slimfx.load(...), which register it")
        kept = _GRAPH_LOWERINGS["triton"](gm.graph)
    reference = gm.graph
    gm.graph = kept[0]
    recompile(gm)
    gm._slimfx_triton = (reference, kept[1])  # the lowered graph is gm.graph while it is installed


def check_triton_runs(gm: nn.Module) -> None:
    """BackendUnavailable unless generated kernels can run for `gm` (its tensors on a GPU, or
    Triton's interpreter on): compile() asks before any work, lower() before unlowering."""
    if importlib.util.find_spec("triton") is None:  # TRITON_INTERPRET=1 without it loaded, then every call failed
        raise BackendUnavailable("backend=\"triton\" runs kernels written in Triton, and the triton package is not "
                                 "installed here: `pip install triton`, or use backend=\"auto\" or \"eager\"")
    if not _triton_has_knobs():  # the kernels read triton.knobs (3.4): compile and load passed, every call failed
        raise BackendUnavailable(f"backend=\"triton\" needs Triton 3.4 or newer, and triton {_triton_version()} is "
                                 "installed here: `pip install 'triton>=3.4'` (with a torch that takes it), or use "
                                 "backend=\"auto\" or \"eager\"")
    if _on_gpu(gm):
        return
    interpreted = _interpreter_on()
    if interpreted:
        return
    if interpreted is None:  # the variable says interpret, and the kernels were made without it
        raise BackendUnavailable(
            "backend=\"triton\" off a GPU runs Triton's interpreter, and TRITON_INTERPRET was set after triton was "
            "imported (loading transformers or exporting a model imports it): its kernels would fail at every "
            "call. Set TRITON_INTERPRET=1 before Python starts (or before anything imports triton), or use "
            "backend=\"auto\" or \"eager\"")
    why = "no CUDA GPU is available" if not torch.cuda.is_available() else "the weights are on the CPU"
    raise BackendUnavailable(
        f"backend=\"triton\" runs generated kernels on a CUDA GPU, and {why}: compile or load with "
        "backend=\"auto\" (the CPU kernels there) or \"eager\"; for the GPU, move the original model there "
        "(`model.to(\"cuda\")`) and compile that (a compiled graph names the device it was compiled on), "
        "or set TRITON_INTERPRET=1 before triton is imported to run the kernels through Triton's interpreter "
        "(slow; for tests and small models)")


def interpret_asked() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter, in the spellings Triton itself
    takes: what decides where triton (or its `knobs`, before 3.4) cannot be asked."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def _triton_has_knobs() -> bool:
    """triton.knobs, which the generated kernels' launchers read, came with Triton 3.4; torch 2.5–2.7
    ship 3.1–3.3. Looked for on disk: find_spec("triton.knobs") imports triton, and TRITON_INTERPRET
    may not be set yet (its kernels would then be compiled ones, failing at every call)."""
    loaded = sys.modules.get("triton")
    if loaded is not None and hasattr(loaded, "knobs"):
        return True
    spec = importlib.util.find_spec("triton")
    folders = getattr(loaded, "__path__", None) or (spec.submodule_search_locations if spec else None) or ()
    return any((Path(folder) / "knobs.py").exists() or (Path(folder) / "knobs").is_dir() for folder in folders)


def _triton_version() -> str:
    """The installed triton's version, by its distribution's metadata; ROCm's and nightly torch's
    come as `pytorch-triton-rocm` / `pytorch-triton`, whose metadata `triton` does not find."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("triton", "pytorch-triton-rocm", "pytorch-triton"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "(of unknown version)"


def _interpreter_on() -> bool | None:
    """True when Triton's interpreter runs jitted kernels; None when TRITON_INTERPRET says it should
    and triton was imported before it was set (its functions are compiled ones then: every call
    failed with "Cannot call @triton.jit'd outside of the scope of a kernel"); False otherwise."""
    if not os.environ.get("TRITON_INTERPRET"):
        return False
    try:
        import triton.language as tl
        from triton import knobs
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # no triton (its own import says so), or one without knobs: the variable decides
        return interpret_asked()
    if not knobs.runtime.interpret:  # the spellings Triton itself takes ("1", "true", "y", …)
        return False
    return True if isinstance(getattr(tl.standard, "sigmoid", None), InterpretedFunction) else None


def _key(node: fx.Node):
    qweight = _ref_args(node)[1]
    return qweight.target if isinstance(qweight, fx.Node) else id(node)


def _strip(gm: fx.GraphModule) -> dict:
    """Put every lowered node back to the reference op, drop the converted buffers and their
    get_attr nodes; return the plans (so they can be put back without converting again)."""
    plans: dict = {}
    triton = getattr(gm, "_slimfx_triton", None)
    if triton is not None:
        reference, summary_ = triton
        plans[_TRITON] = (gm.graph, summary_)
        gm.graph = reference
        recompile(gm)
        del gm._slimfx_triton
    dead: list[fx.Node] = []
    for node in list(_quant_nodes(gm)):
        if node.target not in _LOWERED:
            continue
        extra = node.args[_N_REF_ARGS:]
        attrs = [a for a in extra if isinstance(a, fx.Node) or a is None]
        ints = tuple(a for a in extra if not (isinstance(a, fx.Node) or a is None))
        suffixes = ("int4pack", "int4pack_scales_zeros") if node.target is INT4PACK else (
            "int8pack", "int8pack_scales", "int8pack_offsets")
        tensors = {s: None if a is None else _fetch(gm, a.target) for s, a in zip(suffixes, attrs)}
        plans[_key(node)] = (node.target, tensors, ints)
        node.target, node.args, node.kwargs = QUANT, _ref_args(node), {}
        dead.extend(a for a in attrs if a is not None)
    for a in dict.fromkeys(dead):
        if not a.users:
            owner_path, _, leaf = a.target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            owner._buffers.pop(leaf, None)
            gm.graph.erase_node(a)
    if plans:
        recompile(gm)
    return plans


def unlower(gm: fx.GraphModule) -> Lowering:
    """The reference graph again (same as `lower(gm, "eager")`)."""
    return lower(gm, "eager")


@contextmanager
def unlowered(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """Within the block `gm` is the reference graph with no converted buffers; after it, the
    same lowering is back (without converting again). Calls of other threads wait meanwhile:
    they would find the kernels' buffers gone (runtime/graph_access.py)."""
    with writing(gm):
        plans = _strip(gm)
        try:
            yield gm
        finally:
            if plans:
                lower(gm, "triton" if _TRITON in plans else "auto", _converted=plans)
