"""Calibration: run the graph (as earlier passes left it) on `ctx.calib` and hand chosen
intermediate values to the passes that asked for them.

A pass names the fx nodes it wants to observe and a callback for each; `observe` runs an fx
Interpreter over every batch and calls each callback with the node's value flattened to rows
[tokens, features], padding positions (attention_mask == 0) left out. The precision pass builds
its GPTQ Hessians this way (`HessianAccumulator`, E[x xᵀ]), and so does `adapt … init=error`;
collapse and heal read residual streams the same way.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
from torch import fx

from ..runtime.progress import Progress
from ..runtime.report import counted
from .graph import ModelGraph

__all__ = ["NO_CALIB", "observe", "Observer", "CALIB_HINT", "kept_rows", "real_rows", "forward_ms", "FORWARD_REPEATS", "HessianAccumulator", "DiagonalAccumulator", "damped",
           "paired_moment",
           "output_error"]

Observer = Callable[[torch.Tensor], None]

# What to do when a rule needs calibration and compile() got none (a model of the user's own, or
# a vision model: `slimfx compile` calibrates text models on built-in text by itself).
# Why there is nothing to calibrate on, for every rule that needs it: "none were given" told a
# user who passed calib=[], or ran `slimfx compile` on a model without a tokenizer, otherwise.
NO_CALIB = ("there are no calibration batches (calib= is empty, or the model has no tokenizer to read the "
            "built-in text with)")
CALIB_HINT = ("pass calib= to compile(): batches of inputs, or texts with a model from slimfx.models.load "
              "(which calibrates on built-in text when calib= is left out); `slimfx compile` does that for a "
              "text model with a tokenizer (--calib FILE, --calib-tokens N), and a model without one, or a "
              'vision model, is calibrated only through compile(model, policy, calib=[{"input_ids": …}, …]) '
              'or calib=[{"pixel_values": …}, …]')


def observe(graph: ModelGraph, watch: dict[fx.Node, list[Observer]], batches: list[dict[str, Any]],
            progress: Progress | None = None, description: str = "calibrating") -> None:
    """Run every batch through the graph; call `watch[node]`'s observers with node's rows.

    >>> graph = capture(llama, {"input_ids": ids, "attention_mask": mask})
    >>> site, = find_sites(graph, graph.targets["model.layers.0.self_attn.q_proj"])
    >>> rows = []
    >>> observe(graph, {site.x: [rows.append]}, [{"input_ids": ids, "attention_mask": mask}])
    >>> rows[0].shape          # [tokens of the batch, in_features]
    torch.Size([16, 64])
    """
    names = [i.name for i in graph.inputs]
    # Each run stops after the last watched node: the rest computes nothing an observer sees (the
    # LM head is a sixth of SmolLM2's forward; a heal's rows at a cut in the middle, half of it).
    order = {n: i for i, n in enumerate(graph.module.graph.nodes)}
    last = max(watch, key=order.__getitem__, default=None) if all(n in order for n in watch) else None
    with (progress or Progress()).task(f"{description} ({counted(len(batches), 'batch')})", total=len(batches)) as step:
        for i, batch in enumerate(batches):
            missing = [n for n in names if n not in batch]
            if missing:
                raise ValueError(f"calibration batch {i} lacks inputs {missing}; the graph takes {names}")
            with torch.no_grad():
                try:
                    _Recorder(graph.module, watch, kept_rows(batch), last).run(*(batch[n] for n in names))
                except _Seen:
                    pass
            step()


class HessianAccumulator:
    """Running mean of x xᵀ over every row of every batch, in float64 (or `dtype`).

    float32 was measured and is not the default: on SmolLM2-135M (the precision benchmark's 24 × 128
    calibration tokens) it is close per layer — worst ‖H32 − H64‖/‖H64‖ 2.8e-7 over the 121
    distinct linear inputs; GPTQ int4 g64 act-order on each of the 211 linears from its own H gave
    99.99% identical packed bytes, output errors within ±0.02% — but end to end, sequential GPTQ
    int4 g64 `sym=false zero=float clip=output` scored perplexity 30.480 with float32 against
    30.347 with float64 (fp32 model 28.787): 8% more of the increase. One block's Hessians in
    float64 are 26 MiB on SmolLM2, small beside the rest of what compile holds.

    >>> acc = HessianAccumulator(); acc.add(torch.ones(2, 3, 4)); acc.count, acc.H.shape, acc.H.dtype
    (6, torch.Size([4, 4]), torch.float64)
    """

    def __init__(self, dtype: torch.dtype = torch.float64):
        self._H: torch.Tensor | None = None
        self.count = 0
        self.dtype = dtype

    def add(self, x: torch.Tensor) -> None:
        """Add a batch [..., in]; every leading index is one row."""
        if not x.is_floating_point():
            raise ValueError(f"calibration inputs must be floating point, got {x.dtype}")
        rows = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
        if self._H is not None and rows.shape[1] != self._H.shape[0]:
            raise ValueError(f"calibration input has {rows.shape[1]} features, earlier ones had "
                             f"{self._H.shape[0]}; feed one Linear's inputs per accumulator")
        n = rows.shape[0]
        if n == 0:
            return
        if self._H is None:
            self._H = self._empty(rows.shape[1], rows.device)
        # Running mean rather than a sum, so long calibration runs keep H at the scale of one row.
        self._fold(rows, self.count / (self.count + n), 1 / (self.count + n))
        self.count += n

    def _empty(self, features: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(features, features, dtype=self.dtype, device=device)

    def _fold(self, rows: torch.Tensor, keep: float, weight: float) -> None:
        """H ← keep·H + weight·Σ x xᵀ over the rows, in place: no [in, in] temporary (19 MiB for
        down_proj's input on SmolLM2, at the top of the `init=error` sweep's peak)."""
        self._H.addmm_(rows.T, rows, beta=keep, alpha=weight)

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            raise ValueError("no calibration rows were added; run the model on calibration data first")
        return self._H


def merged(accs: list[HessianAccumulator]) -> HessianAccumulator:
    """One accumulator of every row of `accs` (their H averaged, weighted by rows), of their kind:
    a target read at several sites (one linear called twice) is encoded on all its inputs, the
    output error GPTQ minimises being the sum over its calls. `accs[0]` itself when it is the only one.

    >>> a, b = HessianAccumulator(), HessianAccumulator(); a.add(torch.ones(1, 2)); b.add(3 * torch.ones(3, 2))
    >>> m = merged([a, b]); m.count, m.H[0, 0].item()
    (4, 7.0)
    """
    if len(accs) == 1:
        return accs[0]
    out = type(accs[0]).__new__(type(accs[0]))
    out._H, out.count, out.dtype = None, 0, accs[0].dtype
    for acc in accs:
        if not acc.count:
            continue
        total = out.count + acc.count
        out._H = acc._H.clone() if out._H is None else out._H.mul_(out.count / total).add_(acc._H, alpha=acc.count / total)
        out.count = total
    return out


class DiagonalAccumulator(HessianAccumulator):
    """Running mean of x² per feature: H's diagonal E[x_j²], all `clip=output` before RTN reads
    (`.H` is [in]). HessianAccumulator's [in, in] for every input at once was 0.8 GiB on SmolLM2,
    to read 1/576 of it.

    >>> acc = DiagonalAccumulator(); acc.add(torch.ones(2, 3, 4)); acc.count, acc.H.shape
    (6, torch.Size([4]))
    """

    def __init__(self):
        super().__init__(torch.float64)

    def _empty(self, features: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(features, dtype=self.dtype, device=device)

    def _fold(self, rows: torch.Tensor, keep: float, weight: float) -> None:
        self._H.mul_(keep).add_(rows.pow(2).sum(0), alpha=weight)


def damped(H: torch.Tensor, frac: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """H + frac·mean(diag H)·I as a float64 copy (rows and columns in the order `perm` if given):
    what GPTQ, the error-compensating adapters and the scale refit solve with. The mean is floored
    at the smallest float64 so an all-zero H still gets a positive diagonal. One [in, in] copy:
    the permutation gathered in H's own dtype, the damping added on the copy's diagonal, never an
    identity matrix beside it (19 MiB each at a 1536-wide input, at the top of compile's peak).

    >>> damped(torch.eye(2) * 4, 0.5)
    tensor([[6., 0.],
            [0., 6.]], dtype=torch.float64)
    """
    out = (H if perm is None else H[perm[:, None], perm]).to(torch.float64, copy=perm is None)
    out.diagonal().add_(frac * max(float(out.diagonal().mean()), torch.finfo(torch.float64).tiny))
    return out


def paired_moment(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """E[a bᵀ] [features of a, features of b] over paired rows, in float64: for each batch, its
    rows a [tokens, p] against its rows b [tokens, q] of the same tokens (e.g. two streams' values
    of one node, passes/stream.py's `rows`), summed in place; `pairs` may be a generator, so
    that no batch's float64 copy outlives its product.

    >>> paired_moment([(2 * torch.ones(3, 4), torch.ones(3, 5))])[0, 0].item()
    2.0
    """
    total, count = None, 0
    for a, b in pairs:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"paired rows must be the same tokens: {a.shape[0]} rows against {b.shape[0]}")
        if total is None:
            total = torch.zeros(a.shape[-1], b.shape[-1], dtype=torch.float64)
        total.addmm_(a.double().T, b.double())
        count += b.shape[0]
    if total is None:
        raise ValueError("paired_moment needs at least one batch of rows")
    return total.div_(max(count, 1))  # every row padding: zeros, not NaN


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((w - ŵ) H (w - ŵ)ᵀ) = E_x ‖(w - ŵ) x‖²: with H = E[x xᵀ], the squared output error
    of one calibration row, summed over output features (divide by `out` for a per-feature MSE)."""
    d = (w.double() - w_hat.double())
    return float(((d @ H.double()) * d).sum())


def kept_rows(batch: dict[str, Any]) -> torch.Tensor | None:
    """Flattened attention mask (True = a real token), or None when the batch has none or every
    token is real: real_rows is then a view, not a copy (indexing by an all-true mask copies; at
    down_proj's input on SmolLM2 that copy was 19 MiB of the `init=error` sweep's peak). Decided
    once per batch, not at every watched value."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    keep = mask.reshape(-1) != 0
    return None if bool(keep.all()) else keep


def real_rows(value: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """`value` as rows [tokens, features], the padding positions (`keep` False) left out (a copy);
    a view of `value` when `keep` is None (see kept_rows)."""
    rows = value.detach().reshape(-1, value.shape[-1])
    if keep is not None and keep.numel() == rows.shape[0]:
        rows = rows[keep.to(rows.device)]
    return rows


class _Seen(Exception):
    """Every watched node has been observed: the run stops there."""


class _Recorder(fx.Interpreter):
    """Runs the graph up to `last`; hands each watched node's value, as rows of real tokens, to
    its observers."""

    def __init__(self, module: fx.GraphModule, watch: dict[fx.Node, list[Observer]], keep: torch.Tensor | None,
                 last: fx.Node | None = None):
        super().__init__(module)
        self.watch, self.keep, self.last = watch, keep, last

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        observers = self.watch.get(n)
        if observers:
            rows = real_rows(result, self.keep)
            for fn in observers:
                fn(rows)
        if n is self.last:
            raise _Seen
        return result


FORWARD_REPEATS = 5


def forward_ms(graph: ModelGraph, inputs: dict[str, Any], repeats: int = FORWARD_REPEATS) -> float:
    """The least ms of `repeats` forwards of the graph on `inputs` (after two warm-up calls: after
    one, a tiny model's first timed call still took 15 ms against 2 ms later): the passes' reports
    give a rule's latency before → after with it. The least, not the median of 3: before and after
    are timed minutes apart, and on a shared machine the demo's drop read ×0.23 (9982 → 2287 ms)
    for 2 blocks of 30, its unpad 1500 → 2048 ms where the next rule's before was 1002 ms; the
    fastest run is the one least disturbed."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            start = time.perf_counter()
            graph(**inputs)
            if i > 1:  # the first two calls warm up
                times.append((time.perf_counter() - start) * 1e3)
    return min(times)
