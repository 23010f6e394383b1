"""CPU latency of a compiled SmolLM2-135M: quantized linears through PyTorch's CPU kernels
(`backend="auto"`, runtime/lower.py) against fp32 and against the reference op (`"eager"`).

Every row quantizes the blocks' linears (`blocks.*.** : Linear`; embeddings and the tied head stay
fp32; row "int4+head" also stores the head int4 g64, the embedding keeping its fp32 copy: at one
token the fp32 head is a third of the int4 model's time), is compiled once, and is timed with both backends (the reference inside `unlowered(...)`).
Timings interleave the models round by round (the machine may be shared) and report the median
over rounds of each model's median call time (slimfx.evaluation.latency_ms, inference_mode);
"× fp32" is fp32 time / row time (> 1 is faster than fp32). "rel err" is ‖logits − reference‖ /
‖reference‖ of the lowered model against the same weights through the reference op. Exits
non-zero if int4 misses its targets (≥ 1.0× fp32 at 1×128, ≥ 2× at 1 token).

    .venv/bin/python benchmarks/int4_cpu.py [--rounds 5] [--repeats 10] [--rows int4,int4+head,int8,int2] [--gptq]
"""
from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where kernels.py would shadow the `kernels` package
# transformers imports when it is installed ("cannot import name 'CUDAProperties'"): off it goes.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse
import contextlib
import statistics
import time

import torch

import slimfx
from slimfx.evaluation import default_text, latency_ms
from slimfx.models import load
from slimfx.runtime.lower import unlowered

LINEARS = "blocks.*.** : Linear"
ROWS = {
    "int4": f"quantize {LINEARS} int4 group=64",
    "int4+head": f"quantize {LINEARS} int4 group=64\n    quantize head int4 group=64",
    "int4-asym": f"quantize {LINEARS} int4 group=64 sym=false",
    "int8": f"quantize {LINEARS} int8",
    "int2": f"quantize {LINEARS} int2 group=64",
    "int4-gptq": f"quantize {LINEARS} int4 group=64 method=gptq",
}


def policy(rule: str) -> str:
    return f"policy bench {{\n    {rule}\n}}\n"


def inputs(loaded, tokens: int) -> dict[str, torch.Tensor]:
    ids = torch.as_tensor(loaded.tokenizer(default_text(), return_tensors="pt")["input_ids"]).reshape(-1)
    window = ids[:tokens][None]
    return {"input_ids": window, "attention_mask": torch.ones_like(window)}


class Backend:
    """A compiled model timed under one backend: "eager" runs inside `unlowered(...)`, which puts
    the reference graph back for the block and the same lowering after it (no re-conversion)."""

    def __init__(self, cm, backend: str):
        self.cm, self.backend = cm, backend

    def __call__(self, **kw):
        return self.cm(**kw)

    def context(self):
        return unlowered(self.cm.program) if self.backend == "eager" else contextlib.nullcontext()


def timed(models: dict, batch: dict, rounds: int, repeats: int) -> dict[str, float]:
    """name -> median over rounds of the median call time (ms); models take turns each round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            with model.context() if isinstance(model, Backend) else contextlib.nullcontext():
                times[name].append(latency_ms(model, batch, repeats=repeats, warmup=2))
    return {name: statistics.median(t) for name, t in times.items()}


def rel_err(cm, batch) -> float:
    with torch.inference_mode():
        fast = cm(**batch).logits
        with unlowered(cm.program):
            ref = cm(**batch).logits
    return float((fast - ref).norm() / ref.norm())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rows", default="int4,int4+head,int8,int2")
    ap.add_argument("--gptq", action="store_true", help="also int4 g64 GPTQ (same kernel, same speed)")
    args = ap.parse_args()
    names = [r for r in args.rows.split(",") if r] + (["int4-gptq"] if args.gptq else [])
    if unknown := [n for n in names if n not in ROWS]:  # a KeyError once the model had loaded
        ap.error(f"unknown --rows {unknown}; known: {', '.join(ROWS)}")
    if args.rounds < 1 or args.repeats < 1:
        ap.error("--rounds and --repeats must be at least 1")

    loaded = load("smollm2-135m")
    fp32 = loaded.model.eval()
    compiled = {}
    for name in names:
        start = time.perf_counter()
        cm = slimfx.compile(loaded, policy(ROWS[name]))
        compiled[name] = cm
        print(f"compiled {name}: {cm.lowering} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, CPU "
          f"capability {torch.backends.cpu.get_cpu_capability()}; {args.rounds} rounds x {args.repeats} "
          f"calls; load average before timing {os.getloadavg()[0]:.1f}\n")
    print("| shape | model | backend | ms | × fp32 | rel err vs reference |")
    print("|---|---|---|---:|---:|---:|")
    results = {}
    for tokens in (128, 1):
        batch = inputs(loaded, tokens)
        models = {"fp32": lambda **kw: fp32(**kw, use_cache=False)}
        for name, cm in compiled.items():
            models[f"{name}/auto"] = Backend(cm, "auto")
            models[f"{name}/eager"] = Backend(cm, "eager")
        ms = timed(models, batch, args.rounds, args.repeats)
        errs = {name: rel_err(cm, batch) for name, cm in compiled.items()}
        for name, t in ms.items():
            model, _, backend = name.partition("/")
            err = f"{errs[model]:.2e}" if backend == "auto" else ""
            print(f"| 1×{tokens} | {model} | {backend or '-'} | {t:.2f} | {ms['fp32'] / t:.2f} | {err} |")
            results[(tokens, name)] = ms["fp32"] / t

    if "int4" not in names:  # it said "int4 targets met" with no int4 row run
        print("\nint4 targets not measured: no int4 row (add int4 to --rows)")
        return 0
    failed = []
    if results[(128, "int4/auto")] < 1.0:
        failed.append(f"int4 at 1×128 is ×{results[(128, 'int4/auto')]:.2f} fp32 speed (< 1.0)")
    if results[(1, "int4/auto")] < 2.0:
        failed.append(f"int4 at 1 token is ×{results[(1, 'int4/auto')]:.2f} fp32 speed (< 2.0)")
    print("\n" + ("\n".join(f"MISSED: {f}" for f in failed) if failed else "int4 targets met"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
