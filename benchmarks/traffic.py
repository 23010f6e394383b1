"""Memory traffic of SmolLM2-135M prefill, unfused vs the code generator's fusion groups.

Compiles SmolLM2-135M with int4 weights (group 64, RTN: the format the GEMM templates read),
runs the rewritten graph once on a prefill of 256 tokens, and prints, for the graph as eager
PyTorch runs it (one kernel per op) and as the fusion groups of codegen/partition.py would run it
(one kernel per group): kernels launched, activation bytes read + written, weight bytes read.
Target (issue 10): the fused graph moves ≤ 60% of the unfused activation bytes in ≤ 40% as many
kernels. Measurable without a GPU: sizes come from the run, bytes from shapes and dtypes.

With --inductor it also compiles the same graph with torch.compile (Inductor, CPU) and prints
how many kernels Inductor generated for it (its fusion decisions; slimfx's custom ops fall back).

    .venv/bin/python benchmarks/traffic.py [--tokens 256] [--inductor]
"""
from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where kernels.py would shadow the `kernels` package
# transformers imports when it is installed ("cannot import name 'CUDAProperties'"): off it goes.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse
import platform
import time

import torch

import slimfx
from slimfx.codegen.stats import stats
from slimfx.evaluation import default_text
from slimfx.models import load

POLICY = "quantize blocks.*.** : Linear int4 group=64"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--inductor", action="store_true", help="also count Inductor's kernels for the same graph")
    args = ap.parse_args()
    lm = load("smollm2-135m")
    ids = lm.tokenizer(default_text(), return_tensors="pt")["input_ids"][:, : args.tokens]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    start = time.perf_counter()
    cm = slimfx.compile(lm.model, POLICY, example_inputs=batch, backend="eager")
    print(f"# SmolLM2-135M, `{POLICY}`, prefill of {ids.shape[1]} tokens, batch 1 "
          f"(compiled in {time.perf_counter() - start:.0f} s); {platform.machine()}, torch {torch.__version__}")
    inputs = [batch[n] for n in cm.input_names]
    table = stats(cm.program, inputs)
    unfused, fused = table.unfused, table.fused
    print("| graph | kernels | activation MB read+written | weight MB read |")
    print("|---|---:|---:|---:|")
    for name, t in (("unfused (one kernel per op)", unfused), ("fusion groups", fused)):
        print(f"| {name} | {t.kernels} | {t.activation_bytes / 1e6:.1f} | {t.weight_bytes / 1e6:.1f} |")
    act, kern = fused.activation_bytes / unfused.activation_bytes, fused.kernels / unfused.kernels
    print(f"\nfused/unfused: activation bytes {act:.0%} (target ≤ 60%), kernels {kern:.0%} (target ≤ 40%)\n")
    print(table.render(top=12))
    if args.inductor:
        inductor_kernels(cm.program, inputs)


def inductor_kernels(gm, inputs) -> None:
    try:
        from torch._inductor import metrics

        metrics.reset()
        compiled = torch.compile(gm, backend="inductor")
        with torch.no_grad():
            compiled(*inputs)
        print(f"\nInductor (CPU) generated {metrics.generated_kernel_count} kernels for the same graph")
    except Exception as e:  # Inductor needs a C++ compiler on CPU; say why it is missing
        print(f"\nInductor's partition not obtained: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
