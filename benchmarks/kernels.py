"""Generated Triton kernels against eager PyTorch and Inductor, per template, on a CUDA GPU.

Every case is a small module exported as slimfx captures models and lowered as `backend="triton"`
lowers them (codegen/lower.py); the printed times are medians of `triton.testing.do_bench`, and the
ratios compare within one run:

- **int4 GEMM** (`slimfx::quant_linear`, group 128, symmetric): SmolLM2's linears (576×576,
  576×1536, 1536×576) and Llama-8B-sized ones (4096×4096, 4096×14336, 14336×4096), batch 1, 16,
  256. Against (a) eager: the reference op (dequantize, then F.linear) and (b) Inductor:
  `torch.compile` of the same dequantize + matmul written in torch ops (a custom op is opaque to
  Inductor). At batch 1 (GEMV) also the achieved bandwidth — packed weight + scale bytes / time —
  as a fraction of a measured device-to-device copy.
- **fused RMSNorm** (a row kernel) against eager and Inductor.
- **LoRA r=16 linear** (an `adapt … lora` rule on a 576×576 linear): the fused kernel (base GEMM,
  x·Aᵀ in the same K loop, ·Bᵀ and the scaled add in the epilogue) against the base linear alone,
  both generated, and against eager.

The generated kernels autotune (codegen/tuning.py) on their first call at each shape bucket;
do_bench's warm-up runs absorb that, and the configs chosen are printed at the end
(`SLIMFX_AUTOTUNE=0` times the fixed untuned choice instead).

Activations, norm weights and LoRA weights are in `--dtype`: bfloat16 by default on a GPU (what a
model is served in), float32 under `--interpret` (whose tl.dot cannot multiply bfloat16: float16
there checks the half-precision path); every template computes in float32 and rounds as eager
does (codegen/dtypes.py). A case whose group is not lowered to one kernel stops the script, so no
row ever times eager ops under slimfx's name. Targets (issue
10, an H100/H200): int4 g128 GEMV ≥ 70% of copy bandwidth and ≥ 1.3× Inductor; LoRA r=16 ≤ 1.15×
the base linear; RMSNorm ≥ 1.5× eager; no kernel slower than Inductor on the same group by > 10%.

Without a GPU the script says so and exits 0. `--interpret` runs every case at tiny shapes
through Triton's interpreter instead (checks the script and the kernels' results, times nothing
meaningful; `tests/codegen/test_kernels_benchmark.py` runs it).

    .venv/bin/python benchmarks/kernels.py [--quick] [--interpret] [--dtype float32|float16|bfloat16]
"""
from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where kernels.py would shadow the `kernels` package
# transformers imports when it is installed ("cannot import name 'CUDAProperties'"): off it goes.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse
import time
from typing import Callable


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2's shapes only")
    ap.add_argument("--interpret", action="store_true", help="tiny shapes through Triton's interpreter (no GPU)")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                    help="activations' dtype (default: bfloat16 on a GPU, float32 under --interpret)")
    args = ap.parse_args(argv)
    if args.interpret and args.dtype == "bfloat16":
        ap.error("--interpret cannot time bfloat16 GEMMs: the interpreter's tl.dot multiplies bfloat16 tiles as "
                 "raw integers, so slimfx leaves them to eager ops there; use --dtype float16 or float32")
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU here, so there is nothing to time "
              "(run it on a machine with one; `--interpret` checks the cases through Triton's interpreter)")
        return 0
    dtype = getattr(torch, args.dtype or ("float32" if args.interpret else "bfloat16"))
    bench = Bench(interpret=args.interpret, dtype=dtype)
    print(bench.header())
    gemm_rows(bench, quick=args.quick)
    rmsnorm_rows(bench)
    lora_rows(bench)
    tuned_configs()
    return 0


def tuned_configs() -> None:
    """The config each autotuned launcher chose, per (kernel source, shape bucket, sizes)."""
    from slimfx.codegen.tuning import tuned_launchers

    launchers = tuned_launchers()
    if not launchers:
        return
    print("\nconfigs chosen by autotuning (kernel, bucket: sizes -> config):")
    for (name, *bucket), tuner in sorted(launchers.items(), key=lambda kv: str(kv[0])):
        for sizes, config in tuner.cache.items():
            print(f"  {name} {tuple(bucket)}: {sizes[:len(tuner.keys)]} -> {config}")


class Bench:
    """Timing and the table; under --interpret, tiny shapes on the CPU and wall-clock timing."""

    def __init__(self, interpret: bool, dtype):
        import torch

        self.interpret = interpret
        self.dtype = dtype
        self.device = "cpu" if interpret else "cuda"
        self.torch = torch

    def header(self) -> str:
        import torch
        import triton

        where = "Triton interpreter (CPU; times meaningless)" if self.interpret else torch.cuda.get_device_name()
        return f"# {where}; torch {torch.__version__}, triton {triton.__version__}; activations {self.dtype}"

    def tolerance(self) -> float:
        """Relative error allowed against eager: float32 sums in another order, or one or two
        roundings to a half-precision format apart (a bfloat16 step is 2**-8)."""
        return {self.torch.float32: 1e-3, self.torch.float16: 4e-3}.get(self.dtype, 2e-2)

    def ms(self, fn: Callable[[], object]) -> float:
        if self.interpret:
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100)

    def compiled(self, fn: Callable) -> Callable | None:
        """torch.compile (Inductor), or None under the interpreter (no GPU to generate for)."""
        if self.interpret:
            return None
        # Every case compiles the same Python code at new shapes; past dynamo's recompile limit (8)
        # it would quietly run eager ops under Inductor's name, so each case starts afresh.
        import torch._dynamo

        torch._dynamo.reset()
        return torch.compile(fn, backend="inductor", dynamic=False)

    def copy_bandwidth(self) -> float:
        """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
        n = (1 << 30) // 4 if not self.interpret else 1 << 12
        src = self.torch.empty(n, device=self.device)
        dst = self.torch.empty_like(src)
        return 2 * src.numel() * 4 / (self.ms(lambda: dst.copy_(src)) / 1e3)


def lowered(module, example):
    """`module` exported with a dynamic batch and lowered as backend="triton" lowers a model."""
    import torch
    from torch import fx

    from slimfx.codegen.lower import lower_graph

    ep = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    gm = ep.module()
    graph, summary = lower_graph(gm.graph)
    if summary.eager:
        raise RuntimeError(f"benchmarks/kernels.py: part of the case stays eager ops ({summary.eager}), "
                           "so its time would not be the generated kernel's")
    return fx.GraphModule(gm, graph), summary


def check(got, want, what: str, tolerance: float) -> None:
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
    if err > tolerance:
        raise AssertionError(f"{what}: the generated kernel differs from eager by {err:.2e} (relative)")


# ---- int4 GEMM ------------------------------------------------------------------------------------


def gemm_rows(bench: Bench, quick: bool) -> None:
    import torch

    from slimfx.runtime.formats import QuantFormat, quantize_rtn
    from slimfx.runtime.ops import quant_linear, quant_linear_args

    shapes = [(576, 576), (576, 1536), (1536, 576)] + ([] if quick else [(4096, 4096), (4096, 14336), (14336, 4096)])
    batches = (1, 16, 256)
    if bench.interpret:
        shapes, batches = [(40, 24)], (1, 3)
    copy = bench.copy_bandwidth()
    print(f"\ndevice-to-device copy: {copy / 1e9:.0f} GB/s\n")
    print("| int4 g128 GEMM | batch | eager ms | Inductor ms | slimfx ms | vs eager | vs Inductor | GEMV bandwidth / copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    group = 128 if not bench.interpret else 16
    for k, n in shapes:
        w = torch.randn(n, k) / k ** 0.5
        qw = quantize_rtn(w, QuantFormat(4, group, True))
        packed = [t.to(bench.device) for t in (qw.qweight, qw.scales)]
        args = quant_linear_args(qw)

        class Q(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("qweight", packed[0])
                self.register_buffer("scales", packed[1])

            def forward(self, x):
                return quant_linear(x, self.qweight, self.scales, None, None, *args)

        module = Q().to(bench.device)
        fast, summary = lowered(module, torch.randn(2, k, device=bench.device, dtype=bench.dtype))
        inductor = bench.compiled(_torch_dequant_matmul(bits=4, group=group, k=k))
        for m in batches:
            x = torch.randn(m, k, device=bench.device, dtype=bench.dtype)
            with torch.no_grad():
                want = module(x)
                check(fast(x), want, f"int4 {k}×{n} batch {m}", bench.tolerance())
                t_eager = bench.ms(lambda: module(x))
                t_fast = bench.ms(lambda: fast(x))
                t_ind = bench.ms(lambda: inductor(x, *packed)) if inductor is not None else float("nan")
            bw = ""
            if m == 1:
                moved = packed[0].numel() + packed[1].numel() * 2
                bw = f"{moved / (t_fast / 1e3) / copy:.0%}"
            print(f"| {k}×{n} | {m} | {t_eager:.3f} | {t_ind:.3f} | {t_fast:.3f} | {t_eager / t_fast:.2f}× | "
                  f"{t_ind / t_fast:.2f}× | {bw} |")


def _torch_dequant_matmul(bits: int, group: int, k: int):
    """The reference op's arithmetic in torch ops, for Inductor to fuse: unpack, scale, matmul."""
    import torch

    per = 8 // bits

    def fn(x, qweight, scales):
        shifts = torch.arange(per, device=qweight.device, dtype=torch.int32) * bits
        codes = (qweight.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        codes = codes.reshape(qweight.shape[0], -1)[:, :k]
        s = scales.float().repeat_interleave(group, dim=1)[:, :k]
        w = (codes.float() - (1 << (bits - 1))) * s
        return x @ w.t().to(x.dtype)

    return fn


# ---- RMSNorm --------------------------------------------------------------------------------------


def rmsnorm_rows(bench: Bench) -> None:
    import torch

    class RMSNorm(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(d) + 0.5, requires_grad=False)

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    print("\n| fused RMSNorm | rows×width | eager ms | Inductor ms | slimfx ms | vs eager | vs Inductor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    sizes = [(256, 576), (1, 4096), (256, 4096), (4096, 4096)] if not bench.interpret else [(3, 40)]
    for rows, d in sizes:
        module = RMSNorm(d).to(bench.device, bench.dtype)
        fast, _ = lowered(module, torch.randn(2, d, device=bench.device, dtype=bench.dtype))
        inductor = bench.compiled(module)
        x = torch.randn(rows, d, device=bench.device, dtype=bench.dtype)
        with torch.no_grad():
            check(fast(x), module(x), f"RMSNorm {rows}×{d}", bench.tolerance())
            t_eager, t_fast = bench.ms(lambda: module(x)), bench.ms(lambda: fast(x))
            t_ind = bench.ms(lambda: inductor(x)) if inductor is not None else float("nan")
        print(f"| RMSNorm | {rows}×{d} | {t_eager:.4f} | {t_ind:.4f} | {t_fast:.4f} | {t_eager / t_fast:.2f}× | "
              f"{t_ind / t_fast:.2f}× |")


# ---- LoRA -----------------------------------------------------------------------------------------


def lora_rows(bench: Bench) -> None:
    import torch

    import slimfx

    class Proj(torch.nn.Module):
        def __init__(self, k, n):
            super().__init__()
            self.proj = torch.nn.Linear(k, n, bias=False)

        def forward(self, x):
            return self.proj(x)

    k, n, r = (576, 576, 16) if not bench.interpret else (40, 24, 4)
    module = Proj(k, n).to(bench.device, bench.dtype)
    example = {"x": torch.randn(2, k, device=bench.device, dtype=bench.dtype)}
    # Adapters stored in the activations' dtype, as they are served (float32 ones would be cast
    # on every call, two kernels more).
    stored = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[bench.dtype]
    rule = f"adapt proj lora rank={r} alpha={2 * r} dtype={stored}"
    base = slimfx.compile(module, "", example_inputs=example, backend="triton")
    lora = slimfx.compile(module, rule, example_inputs=example, backend="triton")
    eager = slimfx.compile(module, rule, example_inputs=example, backend="eager")
    with torch.no_grad():
        for p in eager.adapter_parameters():  # a trained-looking adapter (a fresh B is zero)
            p.normal_(0, 0.02)
    lora.load_state_dict(eager.state_dict())
    kernels = lora.lowering.codegen.kernels
    if kernels != 1 or lora.lowering.codegen.eager:
        raise RuntimeError(f"benchmarks/kernels.py: the LoRA linear is {kernels} kernels, "
                           f"eager ops {lora.lowering.codegen.eager}: not the one fused kernel it times")
    dtype = str(bench.dtype).removeprefix("torch.")
    print(f"\n| LoRA r={r} linear ({dtype}, one fused kernel) | batch | base linear (eager) ms | base (slimfx) ms | "
          "LoRA eager ms | LoRA fused ms | kernels | fused ÷ base (slimfx) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in ((1, 16, 256) if not bench.interpret else (3,)):
        x = torch.randn(m, k, device=bench.device, dtype=bench.dtype)
        with torch.no_grad():
            check(lora(x=x), eager(x=x), f"LoRA batch {m}", bench.tolerance())
            times = [bench.ms(lambda f=f: f(x=x)) for f in (module, base, eager, lora)]
        print(f"| {k}×{n} r={r} | {m} | " + " | ".join(f"{t:.4f}" for t in times)
              + f" | {kernels} | {times[3] / times[1]:.2f}× |")


if __name__ == "__main__":
    sys.exit(main())
