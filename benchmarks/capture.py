"""How capture cost grows with depth: tiny Llama with 2, 4, 8, 16, 32 blocks.

Each size runs in a fresh process, so its peak resident memory is its own. Prints a table of
capture time, time per block and peak-memory growth over the process baseline (after model
construction; the first capture also imports torch.export's machinery, about 20 MiB and half a
second, a fixed part of every row), plus ratios to the 2-block model.

    .venv/bin/python benchmarks/capture.py [--blocks 2 4 8 16 32]
"""
from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where kernels.py would shadow the `kernels` package
# transformers imports when it is installed ("cannot import name 'CUDAProperties'"): off it goes.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse
import json
import platform
import subprocess

CHILD = r"""
import json, resource, time, sys
import torch
from slimfx.models import tiny
from slimfx.passes.capture import capture
torch.set_num_threads(1)
loaded = tiny("llama", layers=int(sys.argv[1]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
graph = capture(loaded.model, loaded.example_inputs)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
capture(loaded.model, loaded.example_inputs)
cached = time.perf_counter() - start
print(json.dumps({"blocks": len(graph.blocks), "nodes": len(graph.module.graph.nodes),
                  "seconds": seconds, "cached_seconds": cached, "peak_mib": (peak - base) / 1024}))
"""


def measure(blocks: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(blocks)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    args = parser.parse_args()
    if min(args.blocks) < 1:  # 0 raised a ZeroDivisionError in the s/block column
        parser.error("--blocks must each be at least 1")
    rows = []
    for n in args.blocks:
        rows.append(measure(n))
        print(f"measured {n} blocks", file=sys.stderr)
    first = rows[0]
    print(f"capture of tiny Llama (hidden 64) on {platform.machine()}, {_cpu()}, torch {_torch_version()}")
    print("| blocks | fx nodes | capture s | s/block | ×time vs first | peak MiB over baseline | "
          "×memory vs first | cached capture s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['blocks']} | {r['nodes']} | {r['seconds']:.2f} | {r['seconds'] / r['blocks']:.3f} | "
              f"{r['seconds'] / first['seconds']:.2f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / max(first['peak_mib'], 1e-9):.2f} | {r['cached_seconds']:.3f} |")


def _cpu() -> str:
    import os

    return f"{os.cpu_count()} cores"


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
