"""Autotuning of the generated kernels: the candidate launch configurations of each template, and
the launcher that times them once per shape bucket and keeps the fastest.

- **When.** On a GPU launches are tuned by `triton.autotune` over the template's configs: a
  kernel's first launch at each bucket goes through it, later ones launch its choice directly
  (codegen/kernel.py `Kernel.launch_tuned`).
  Under Triton's interpreter (no GPU) a launch uses the template's fixed first choice: the
  interpreter has no driver to time on, and numpy's speed says nothing about a GPU's.
  `SLIMFX_AUTOTUNE=0` turns tuning off on a GPU too (the fixed choice, no timing runs);
  `SLIMFX_AUTOTUNE=1` turns it on under the interpreter as well, timed by the wall clock — slow,
  and only there to exercise the tuner without a GPU (the test suite does).
- **Cost.** The first call of a kernel source at a new bucket compiles and times every config
  (seconds per source on a GPU); Triton keeps the compiled configs and, where it can, the choice
  on disk, so later processes pay little. The configs have never been timed on a GPU here (none
  was lent): they are the usual Triton-tutorial tile sizes, not measured choices.
- **Keys.** The GEMM template is tuned per bucket of M (rows: 1, 2–4, 5–16, then powers of two
  up to 256, then one bucket) and per (K, N…): a decode step and a prefill get their own choice, but a
  new sequence length in the same bucket does not time the configs again. The row template is
  tuned per row width.
- **Every config computes the same numbers** (the kernels mask ragged tiles; BK changes only the
  order of the K-sum, within float32 rounding; a GEMV config sums the same products as tl.dot in
  another order), so tuning changes speed, never the result beyond that rounding. tl.dot needs
  16 or more on each side of a tile: every GEMM config that uses it has it.
"""
from __future__ import annotations

import inspect
import os
import time
from typing import Any, Callable

__all__ = ["tuning_enabled", "gemm_configs", "row_configs", "m_bucket", "autotuned", "wall_clock_bench",
           "launcher", "tuned_launchers"]

ENV = "SLIMFX_AUTOTUNE"

# (source name, bucket…) -> triton.autotune launcher: the timings it keeps are per source, not per group
_TUNED: dict[tuple, Any] = {}


def launcher(key: tuple, make: Callable[[], Any]):
    """The tuned launcher for `key`, made by `make` the first time in this process."""
    if key not in _TUNED:
        _TUNED[key] = make()
    return _TUNED[key]


def tuned_launchers() -> dict[tuple, Any]:
    """The autotuned launchers made so far in this process: (source name, bucket…) -> launcher
    (its `.cache` maps the sizes it met to the config it chose)."""
    return dict(_TUNED)


def tuning_enabled(interpreted: bool) -> bool:
    """Whether a launch autotunes (module doc): on a GPU unless SLIMFX_AUTOTUNE=0; under the
    interpreter only with SLIMFX_AUTOTUNE=1."""
    setting = os.environ.get(ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{ENV}={setting!r}: use 1 (tune, even under Triton's interpreter), "
                         "0 (never tune) or leave it unset (tune on a GPU only)")
    if setting:
        return setting == "1"
    return not interpreted


def m_bucket(m: int) -> int:
    """The GEMM's tuning bucket of M rows: 1 (a decode step of one sequence), 4 for 2–4, 16 for
    5–16 (small batches), then the next power of two up to 256, then 512 for everything larger
    (prefill)."""
    if m == 1:
        return 1
    if m <= 4:
        return 4
    if m <= 16:
        return 16
    if m <= 256:
        return 1 << (m - 1).bit_length()
    return 512


def gemm_configs(bucket: int, lora_width: int = 0) -> list[dict]:
    """The GEMM template's candidates for an M bucket: dicts of BM/BN/BK/GEMV and the launch's
    num_warps/num_stages. Small M: one row tile of 16, wide and deep weight tiles (a GEMV reads
    the weight once; more K per step hides the dequantize). Large M: square-ish tiles.

    Buckets of 1 and 4 rows also get GEMV configs (emit_gemm.py `_product`): no tl.dot, so row
    tiles of exactly 1 or 4 rows and column tiles down to 8 — at batch 1 SmolLM2's 576-wide
    linears are 9-18 programs with tl.dot's tiles (BN 32-64) on an H100's 132 SMs, 36-72 with
    these. Their [BM, BN, BK] products are kept to 8,192 values (64 per thread at 4 warps). A
    LoRA-fused GEMM (`lora_width`: its widest rank as padded in the source) also forms [BM, RP,
    BK] and [BM, BN, RP] products: those are kept to 128 values a thread — ptxas (aot.py) spilled
    0.7-1.4 KB a thread at 256 with rank 64 in the 4-row bucket, nothing at rank 16 or 32.
    Never timed on a GPU here: the tuner, not this list, decides which form wins."""
    if bucket <= 16:
        tiles = [(16, 32, 64), (16, 64, 64), (16, 64, 128), (16, 128, 64), (16, 128, 128), (16, 32, 256),
                 (16, 64, 256)]
        # 2 warps cannot hold a 16×128 tile's operands at BK=128: ptxas spills 208-224 bytes (aot.py)
        dots = [_config(bm, bn, bk, warps, 3) for bm, bn, bk in tiles for warps in (2, 4)
                if warps > 2 or bn * bk < 128 * 128]
        if bucket > 4:
            return dots
        gemv = [(8, 256), (8, 512), (16, 128), (16, 256), (32, 128), (32, 256), (64, 128)] if bucket == 1 else \
            [(8, 128), (8, 256), (16, 128), (32, 64)]
        # 8 warps only where each thread holds 16 or more of the tile's products: with 8, Triton
        # 3.6's ptxas (the GPU image's) gave the 1×16×128 LoRA GEMV 32 registers and spilled 8
        # bytes (3.9's did not); the tile's 4-warp launch stays.
        return dots + [_config(bucket, bn, bk, warps, 3, gemv=True) for bn, bk in gemv for warps in (4, 8)
                       if bucket * lora_width * max(bn, bk) <= 128 * 32 * warps
                       and (warps == 4 or bucket * bn * bk >= 16 * 32 * warps)]
    if bucket <= 64:
        tiles = [(32, 64, 64), (32, 128, 64), (64, 64, 64), (64, 128, 32), (16, 64, 64)]
    else:
        tiles = [(64, 64, 64), (64, 128, 32), (128, 64, 32), (128, 128, 32), (64, 128, 64), (128, 128, 64)]
    # A 128×128 float32 accumulator is 128 registers a thread at 4 warps: ptxas spilled 1.6 KB a
    # thread there (SmolLM2's merged q/k/v, codegen/aot.py), so those tiles get 8 warps only.
    return [_config(bm, bn, bk, warps, stages) for bm, bn, bk in tiles for warps, stages in ((4, 3), (8, 4))
            if warps > 4 or bm * bn < 128 * 128]


def row_configs() -> list[dict]:
    """The row template's candidates: one program per row whatever the config, so only how many
    warps share a row (BLOCK, the row width's next power of two, is set by the launcher)."""
    return [{"kwargs": {}, "num_warps": w, "num_stages": 1} for w in (1, 2, 4, 8, 16)]


def autotuned(fn, configs: list[dict], key: list[str], interpreted: bool):
    """`fn` (a @triton.jit function) behind triton.autotune over `configs`, keyed on the argument
    names `key`; timed by Triton's benchmarker on a GPU, by the wall clock under the interpreter.
    On a GPU the choice is also kept in Triton's disk cache where this Triton can (cache_results),
    so a later process does not time the same kernel and sizes again."""
    import triton

    choices = [triton.Config(c["kwargs"], num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]
    accepts = inspect.signature(triton.autotune).parameters
    options = {}
    if interpreted:
        if "do_bench" not in accepts:
            raise RuntimeError(f"triton {triton.__version__}'s autotune takes no do_bench: it cannot be timed "
                               f"under the interpreter; unset {ENV}")
        options["do_bench"] = wall_clock_bench
    elif "cache_results" in accepts:
        options["cache_results"] = True
    return triton.autotune(configs=choices, key=key, **options)(fn)


def wall_clock_bench(fn: Callable[[], object], quantiles=None, **_) -> float | list[float]:
    """Triton's do_bench contract (milliseconds; a list when quantiles are asked for), timed by the
    wall clock: the best of three runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return [best] * len(quantiles) if quantiles else best


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, gemv: bool = False) -> dict:
    return {"kwargs": {"BM": bm, "BN": bn, "BK": bk, "GEMV": gemv}, "num_warps": warps, "num_stages": stages}
