"""Ahead-of-time compilation of generated kernels for a GPU that is not here.

Triton's compiler runs the whole way — Triton IR, GPU IR, LLVM IR, PTX, and a cubin from the
ptxas Triton ships — for a named target without a driver, so a machine with no GPU can check what
the interpreter cannot: that a kernel source compiles for an H100/H200 (sm_90) under each launch
configuration it may get, which instructions its products become (`wgmma`/`mma`: tensor cores;
`fma`: CUDA cores; any `tf32`), how much shared memory each configuration asks for, against
what a block may have, and how many registers a thread needs and whether any spill to local
memory (a spilling GEMV would be bound by that traffic, not by its weights'). It proves nothing
about speed, and a kernel is never run here.

The argument types come from the graph: each pointer argument in the order the launchers pass
them (the kernel's inputs, then its outputs) takes its value's dtype; every other runtime argument
(sizes, strides) is a 32-bit integer. Triton's JIT also specializes on the values of a call: an
integer equal to 1 becomes a constant, one that is a multiple of 16 and every 16-byte-aligned
pointer carry that as a hint — which decides whether loads are vectorized and pipelined (without
them no load here became `cp.async`, and `num_stages` changed nothing). So each configuration
carries the integers of a sample call ("ints": contiguous rows and weights, M of its bucket) and
pointers are taken as aligned, as torch allocates them. The compiling happens in a process of its own (codegen/aot_worker.py),
one for all the kernels asked for at once: a process whose Triton interprets cannot compile.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .kernel import Kernel, tensor_val

__all__ = ["Compiled", "HOPPER", "SHARED_BYTES", "compile_for", "compile_many", "launch_configs", "tuned_configs"]

HOPPER = 90  # sm_90: the H100 and H200
SHARED_BYTES = {90: 232448}  # shared memory one block may use (227 KiB on sm_90)
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
          torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True)
class Compiled:
    config: dict  # {"kwargs": constexprs, "num_warps": …, "num_stages": …}
    types: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr")
    ptx: str
    shared: int  # bytes of shared memory a block uses
    registers: int  # per thread, as ptxas assembles the PTX
    spilled: int  # bytes of spill stores and loads (local memory a register did not fit in)

    def uses(self, instruction: str) -> bool:
        """Whether the PTX has `instruction` (a prefix such as "wgmma.mma_async" or "fma.rn.f32")."""
        return instruction in self.ptx

    @property
    def tensor_cores(self) -> bool:
        return self.uses("wgmma.mma_async") or self.uses("mma.sync.aligned")


def launch_configs(kernel: Kernel) -> list[dict]:
    """The configurations a launch uses with autotuning off (SLIMFX_AUTOTUNE=0): the GEMM's
    fixed tiles for a decode step (1 row) and a prefill (256 rows); the row template's one
    program per row."""
    from .emit_gemm import block_sizes

    if kernel.template == "gemm":
        return [_config({**dict(zip(("BM", "BN", "BK"), block_sizes(m, interpreted=False))), "GEMV": False}, 4, 3,
                        _gemm_ints(kernel, m)) for m in (1, 256)]
    return [_config({"BLOCK": _row_block(kernel)}, 4, 3, _row_ints(kernel))]


def tuned_configs(kernel: Kernel) -> list[dict]:
    """Every configuration autotuning may time for `kernel` on a GPU (codegen/tuning.py): the
    GEMM's candidates of each M bucket (at that many rows), the row template's warps per row."""
    from .tuning import gemm_configs, row_configs

    if kernel.template == "gemm":
        return [_config(c["kwargs"], c["num_warps"], c["num_stages"], _gemm_ints(kernel, bucket))
                for bucket in (1, 4, 16, 32, 64, 128, 256, 512) for c in gemm_configs(bucket, kernel.lora_width)]
    block = _row_block(kernel)
    return [_config({**c["kwargs"], "BLOCK": block}, c["num_warps"], c["num_stages"], _row_ints(kernel))
            for c in row_configs()]


def _gemm_ints(kernel: Kernel, m: int) -> dict[str, int]:
    """The integer arguments of a call on `m` contiguous rows with contiguous [N, K] weights —
    what Triton's JIT would see and specialize on (module doc)."""
    ints = {"M": m, "K": kernel.k, "stride_xm": kernel.k, "stride_xk": 1}
    ints.update({f"N{j}": n for j, n in enumerate(kernel.ns)})
    if "w" in kernel.roles:  # dense weights (merged anchors share a format: all of them)
        ints.update({name: value for j in range(len(kernel.ns))
                     for name, value in ((f"stride_w{j}n", kernel.k), (f"stride_w{j}k", 1))})
    return ints


def _row_ints(kernel: Kernel) -> dict[str, int]:
    return {"D": _row_width(kernel)}


def compile_for(kernel: Kernel, configs: Optional[list[dict]] = None, arch: int = HOPPER) -> list[Compiled]:
    """`kernel`'s source compiled for CUDA compute capability `arch` under each of `configs`
    (default: `launch_configs`)."""
    return compile_many([(kernel, configs)], arch)[0]


def compile_many(jobs: Sequence[tuple[Kernel, Optional[list[dict]]]], arch: int = HOPPER) -> list[list[Compiled]]:
    """`compile_for` of each (kernel, configs), in one worker process. A source Triton cannot
    compile raises RuntimeError with Triton's message."""
    payload, configs_of = [], []
    for kernel, configs in jobs:
        configs = configs if configs is not None else launch_configs(kernel)
        configs_of.append(configs)
        pointers = [_pointer(tensor_val(n), kernel, n.name) for n, _ in kernel.inputs + kernel.outputs]
        payload.append({"path": str(kernel.cached_file()), "pointers": pointers, "configs": configs, "arch": arch})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    worker = Path(__file__).with_name("aot_worker.py")
    done = subprocess.run([sys.executable, str(worker)], input=json.dumps(payload), capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        why = done.stderr.rpartition("aot_worker: ")[2] if "aot_worker: " in done.stderr else done.stderr
        raise RuntimeError(f"ahead-of-time compilation for sm_{arch} failed: {why.strip()[-4000:]}")
    results = json.loads(done.stdout)
    return [[Compiled(c, r["types"], r["ptx"], r["shared"], r["registers"], r["spill_stores"] + r["spill_loads"])
             for c, r in zip(configs, built)]
            for configs, built in zip(configs_of, results)]


def _pointer(val: Optional[torch.Tensor], kernel: Kernel, name: str) -> str:
    if val is None or val.dtype not in _TYPES:
        raise ValueError(f"{kernel.name}: no Triton pointer type for {name} ({getattr(val, 'dtype', 'no value')})")
    return _TYPES[val.dtype]


def _row_width(kernel: Kernel) -> int:
    val = tensor_val(getattr(kernel, "full", None))
    width = val.shape[-1] if val is not None and val.dim() else 1
    if isinstance(width, torch.SymInt):
        raise ValueError(f"{kernel.name}: its row width is known only at run time")
    return int(width)


def _row_block(kernel: Kernel) -> int:
    import triton

    return triton.next_power_of_2(_row_width(kernel))


def _config(kwargs: dict, warps: int, stages: int, ints: dict[str, int]) -> dict:
    """A launch configuration, with the integer arguments of a sample call ("ints")."""
    return {"kwargs": kwargs, "num_warps": warps, "num_stages": stages, "ints": ints}
