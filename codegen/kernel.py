"""What every template produces: a `Kernel` — Triton source text, the graph values it reads and
writes in argument order, and a launcher.

- **The source is the cache key.** It names no graph node (variables are numbered), so the 30
  RMSNorm groups of a model are one source, one file and one Triton compilation. `compile()` writes
  it to `$SLIMFX_KERNEL_CACHE` (default: `<tmp>/slimfx-kernels-<uid>`, refused if another user owns it or anyone may write it) as `<name>.py`, the name ending in
  the source's hash, and imports that file — after checking that its text is exactly the source
  (a stale or edited file is rewritten, never imported).
- **`listing()`** is what `slimfx compile --emit-kernels` writes: a header naming the graph nodes
  the kernel replaces, then the source.
- **Shapes at run time.** Outputs are allocated from the group's symbolic shapes, with the symbols
  (batch, sequence, …) bound from the shapes of the inputs of that call — evaluated once per
  distinct binding and looked up after that: a launch's host time is what a small GPU call costs.

Without a GPU, kernels run through Triton's interpreter (`TRITON_INTERPRET=1` set before triton is
first imported); runtime/lower.py checks that before it lowers anything.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import sympy
import torch
from torch import fx

from . import interpreter_compat

__all__ = ["Kernel", "Shapes", "cache_dir", "interpreted", "source_name", "tensor_val"]


def interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels: triton's own reading of TRITON_INTERPRET
    (imported here, not at module level: runtime/lower.py sets the variable before triton's first
    import). Without triton, or with one older than 3.4 (no `triton.knobs`), the variable's own
    spellings decide: writing a listing of a bfloat16 model (`--emit-kernels`, `--stats`) needs
    no triton, and died on `from triton import knobs`."""
    try:
        from triton import knobs
    except ImportError:
        from ..runtime.lower import interpret_asked

        return interpret_asked()
    return bool(knobs.runtime.interpret)


def cache_dir() -> Path:
    """`$SLIMFX_KERNEL_CACHE`, else a folder of this user's own under the temporary directory:
    cached files are imported, so a folder others can write must not be one."""
    return Path(os.environ.get("SLIMFX_KERNEL_CACHE") or Path(tempfile.gettempdir()) / f"slimfx-kernels-{_user()}")


def _user() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")


def _check_private(folder: Path) -> None:
    """Refuse a cache folder another user owns or every user may write: its files are imported
    as code. (Group write is allowed: umask 002 with a group of one's own is common.)"""
    if not hasattr(os, "getuid"):
        return
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o002:
        # "remove it" only for the default folder, which slimfx made: a SLIMFX_KERNEL_CACHE=/tmp
        # was told to remove /tmp
        ours = "SLIMFX_KERNEL_CACHE" not in os.environ
        what = "remove it, or set" if ours else "set"
        raise PermissionError(f"the kernel cache {folder} is {'owned by another user' if st.st_uid != os.getuid() else 'writable by every user'}"
                              f" (mode {st.st_mode & 0o7777:o}), and slimfx imports the kernels it holds: {what} "
                              "SLIMFX_KERNEL_CACHE to a folder of your own (e.g. ~/.cache/slimfx-kernels)")


def source_name(template: str, source: str) -> str:
    return f"{template}_{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


class Shapes:
    """The symbolic shapes of a kernel's outputs, evaluated for the shapes of one call's inputs."""

    def __init__(self, inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]):
        # symbolic size -> (input index, dim): bare symbols, and whole expressions such as the
        # batch × sequence of GPT-2's and OPT's flattened [B·S, D] rows, whose factors no input
        # holds apart (an output of that size is read off the input dim, not solved for)
        self.where: dict[sympy.Expr, tuple[int, int]] = {}
        for i, node in enumerate(inputs):
            val = tensor_val(node)
            for d, size in enumerate(() if val is None else val.shape):
                expr = _expr(size)
                if isinstance(expr, sympy.Expr):
                    self.where.setdefault(expr, (i, d))
        self.exprs = [tuple(_expr(s) for s in tensor_val(n).shape) for n in outputs]
        symbols = {e for e in self.where if isinstance(e, sympy.Symbol)}
        for n, shape in zip(outputs, self.exprs):
            solved = [e for e in shape if isinstance(e, sympy.Expr) and e not in self.where]
            missing = set().union(*(e.free_symbols for e in solved)) - symbols
            if missing:
                from .expr import Unsupported

                raise Unsupported(f"{n.name}'s shape uses {sorted(map(str, missing))}, which no input of the group has")

        # Every launch asks for the shapes: they are evaluated once per distinct sizes of the
        # symbolic input dims (batch, sequence length) and then looked up, so no sympy runs on a
        # call's host path (a GPU launch costs microseconds). Emptied when full: a decode loop's
        # growing length must not grow it without end.
        self.reads = tuple(self.where.values())
        self.seen: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {}

    def __call__(self, values: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], ...]:
        key = tuple([values[i].shape[d] for i, d in self.reads])
        shapes = self.seen.get(key)
        if shapes is None:
            if len(self.seen) >= 1024:
                self.seen.clear()
            shapes = self.seen[key] = self.evaluate(dict(zip(self.where, key)))
        return shapes

    def evaluate(self, sizes: dict[sympy.Expr, int]) -> tuple[tuple[int, ...], ...]:
        binding = {e: v for e, v in sizes.items() if isinstance(e, sympy.Symbol)}
        return tuple(tuple(e if isinstance(e, int) else sizes[e] if e in sizes else int(e.xreplace(binding))
                           for e in shape) for shape in self.exprs)


def _expr(size) -> Any:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_Integer else expr
    return int(size)


@dataclass
class Kernel:
    """One generated kernel. Subclasses (templates) define `launch(values) -> outputs`."""

    template: str
    source: str
    inputs: list[tuple[fx.Node, str]]  # (graph value, role) in argument order
    outputs: list[tuple[fx.Node, str]]
    nodes: list[fx.Node]  # the group's nodes it replaces
    _fn: Optional[object] = field(default=None, repr=False)
    _shapes: Optional[Shapes] = field(default=None, repr=False)
    # What every launch would otherwise recompute from the graph (the inputs' and outputs' dtypes),
    # and per tuning bucket the config triton.autotune chose (`launch_tuned`).
    _input_dtypes: Optional[tuple] = field(default=None, repr=False, compare=False)
    _output_dtypes: Optional[tuple] = field(default=None, repr=False, compare=False)
    _chosen: dict = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def name(self) -> str:  # cached: a launch at a new tuning bucket asks for it, and it hashes the source
        return source_name(self.template, self.source)

    def listing(self, same: Sequence["Kernel"] = ()) -> str:
        """The source under a header naming the graph nodes it replaces — its own group's and those
        of `same`, other groups with this source (for --emit-kernels)."""
        groups = list(same) or [self]
        header = [f"# slimfx generated kernel {self.name} ({self.template} template), "
                  f"replacing {len(groups)} group{'s' * (len(groups) != 1)} of the graph:"]
        for i, k in enumerate(groups, 1):
            header.append(f"# group {i}: " + ", ".join(f"{n.name} ({n.target})" for n in k.nodes))
            header.append(f"#   reads {', '.join(n.name for n, _ in k.inputs)}; "
                          f"writes {', '.join(n.name for n, _ in k.outputs)}")
        return "\n".join(header) + "\n\n" + self.source

    def compile(self, cache: Optional[Path] = None):
        """The `@triton.jit` function, imported from the cache file of this source."""
        if self._fn is None:
            path = self.cached_file(cache)
            interpreter_compat.patch()  # before the first launch: Triton ≤ 3.6's interpreter on numpy ≥ 2.4
            spec = importlib.util.spec_from_file_location(f"slimfx_kernels.{self.name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._fn = module.kernel
        return self._fn

    def cached_file(self, cache: Optional[Path] = None) -> Path:
        """The cache file of this source, written first if missing or not exactly the source."""
        folder = Path(cache or cache_dir())
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a file where the folder should be
            raise NotADirectoryError(f"the kernel cache {folder} is not a folder (a file is in the way): set "
                                     "SLIMFX_KERNEL_CACHE to a folder of your own, or move the file") from None
        _check_private(folder)
        path = folder / f"{self.name}.py"
        if path.is_dir() and not path.is_symlink():  # nothing a save made: say so, not IsADirectoryError
            raise IsADirectoryError(f"{path} is a folder where the kernel cache keeps a file: remove it")
        # bytes, not text: a damaged file (not UTF-8) is rewritten like any other that differs
        if not path.exists() or path.read_bytes() != self.source.encode():
            # A fresh file (O_EXCL), never one a link at a predictable name points to.
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{self.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(self.source.encode())
            os.replace(tmp, path)
        return path

    def tuned(self, bucket: tuple, make: Callable[[], Any]):
        """The autotuned launcher of this source for `bucket` (codegen/tuning.py), made by `make`
        once per process: every group with this source shares it, so one shape is timed once."""
        from .tuning import launcher

        return launcher((self.name, *bucket), make)

    def launch_tuned(self, bucket: tuple, make: Callable[[], Any], grid, args: Sequence, kwargs: dict,
                     sizes: tuple = ()) -> None:
        """`fn[grid](*args, **kwargs)` through the tuned launcher of `bucket` (`tuned`) the first
        time at `bucket` and `sizes`; later calls launch its @triton.jit function with the config
        it chose directly. The autotuner's key is its key arguments (`sizes`: those of them that
        vary between this kernel's calls) and every argument's dtype (fixed per kernel by
        check_dtypes), so its choice cannot change: going around it only skips its per-call
        Python (dicts of every argument, a dtype string each), microseconds of a launch."""
        chosen = self._chosen.get((bucket, sizes))
        if chosen is None:
            tuned = self.tuned(bucket, make)
            tuned[grid](*args, **kwargs)
            # the config this launch ran (Autotuner.run sets it; the autotuner is not thread-safe itself)
            self._chosen[bucket, sizes] = tuned.fn, tuned.best_config.all_kwargs()
        else:
            fn, config = chosen
            fn[grid](*args, **kwargs, **config)

    def shape_nodes(self) -> list[fx.Node]:
        """The values whose run-time shapes the launcher needs: the outputs (a template may add)."""
        return [n for n, _ in self.outputs]

    def output_shapes(self, values: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], ...]:
        """The shapes of `shape_nodes()` for this call's inputs."""
        return self.check_shapes()(values)

    def check_shapes(self) -> Shapes:
        """The `Shapes` of the outputs. The templates build it as they emit: an output whose
        size no input's dims determine (a GEMM's [B·S, N] rows viewed as [B, S, N] in its
        epilogue) raises Unsupported while lowering — the group is split or left to eager ops —
        instead of at every call."""
        if self._shapes is None:
            self._shapes = Shapes([n for n, _ in self.inputs], self.shape_nodes())
        return self._shapes

    def check_dtypes(self, values: Sequence[torch.Tensor]) -> None:
        """The source reads each input in the dtype its graph value had (codegen/dtypes.py): a
        tensor of another dtype would be read as the wrong format, so it is refused by name."""
        if self._input_dtypes is None:
            self._input_dtypes = tuple(None if tensor_val(n) is None else tensor_val(n).dtype for n, _ in self.inputs)
        for value, want, (node, role) in zip(values, self._input_dtypes, self.inputs):
            if want is not None and value.dtype != want:
                raise TypeError(f"kernel {self.name}: its {role} input {node.name} is {value.dtype}, the kernel "
                                f"was generated for {want}; compile the model again in the dtype it runs in")

    def output_dtypes(self) -> tuple[torch.dtype, ...]:
        if self._output_dtypes is None:
            self._output_dtypes = tuple(tensor_val(n).dtype for n, _ in self.outputs)
        return self._output_dtypes

    def launch(self, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} defines no launcher")


def rows_of(shape: Sequence[int]) -> int:
    return math.prod(shape[:-1]) if len(shape) else 1
