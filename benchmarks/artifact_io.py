"""Artifact save/load time against Hugging Face's save_pretrained/from_pretrained, SmolLM2-135M.

Compiles SmolLM2-135M twice (empty policy = fp32, and int4 group-64 on every block linear),
then times, in this one process: `cm.save(dir)`, `slimfx.load(dir)`, `model.save_pretrained(dir)`
and `AutoModelForCausalLM.from_pretrained(dir)` (of the same fp32 model both times; there is no
HF int4 equivalent). Each is the median of --repeat runs, after one untimed warm-up that pays
for imports. Also checks that the loaded model's logits equal the saved one's bit for bit.

    .venv/bin/python benchmarks/artifact_io.py [--repeat 3]
"""
from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where kernels.py would shadow the `kernels` package
# transformers imports when it is installed ("cannot import name 'CUDAProperties'"): off it goes.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

INT4 = "policy p {\n quantize blocks.*.** : Linear int4 group=64\n}\n"


def timed(fn, repeat: int, clock: "LoweringClock | None" = None) -> tuple[float, float]:
    """(median seconds, median seconds of it spent lowering) after one warm-up call that pays
    for imports and fills the page cache."""
    fn()
    times, lowering = [], []
    for _ in range(repeat):
        before = clock.seconds if clock else 0.0
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        lowering.append((clock.seconds if clock else 0.0) - before)
    return statistics.median(times), statistics.median(lowering)


class LoweringClock:
    """Seconds spent in CompiledModel.set_backend (CPU-kernel lowering, runtime/lower.py), which
    CompiledModel.__init__ runs on every load: not artifact I/O, so shown on its own."""

    def __init__(self):
        from slimfx.runtime.compiled import CompiledModel

        self.seconds = 0.0
        original = getattr(CompiledModel, "set_backend", None)
        if original is None:
            return

        def timed_set_backend(cm, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(cm, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        CompiledModel.set_backend = timed_set_backend


def du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import slimfx
    from slimfx import models
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = models.load("smollm2-135m")
    x = lm.encode(["Artifacts should load as fast as a save_pretrained folder."])
    work = Path(tempfile.mkdtemp(prefix="slimfx-artifact-io-"))
    hf_dir = work / "hf"

    def hf_save():
        lm.model.save_pretrained(hf_dir)

    def hf_load():
        AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)

    hf = {"save": timed(hf_save, args.repeat)[0], "load": timed(hf_load, args.repeat)[0],
          "mib": du(hf_dir)}
    clock = LoweringClock()
    rows = []
    for label, policy in (("fp32", ""), ("int4", INT4)):
        print(f"compiling {label} ...", file=sys.stderr)
        cm = slimfx.compile(lm, policy)
        out = work / label
        save = timed(lambda: cm.save(out), args.repeat)[0]
        load, lowering = timed(lambda: slimfx.load(out), args.repeat, clock)
        back = slimfx.load(out)
        with torch.no_grad():
            same = torch.equal(back(**x).logits, cm(**x).logits)
        rows.append((label, save, load, lowering, du(out), same))

    print(f"SmolLM2-135M artifact I/O, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, median of {args.repeat}\n")
    head = (f"{'model':<6} {'slimfx save s':>13} {'slimfx load s':>13} {'(lowering s)':>12} "
            f"{'save_pretrained s':>17} {'from_pretrained s':>17} {'save ×HF':>9} {'load ×HF':>9} "
            f"{'MiB':>7} {'HF MiB':>7}  bit-identical")
    print(head)
    print("-" * len(head))
    for label, save, load, lowering, mib, same in rows:
        print(f"{label:<6} {save:>13.2f} {load:>13.2f} {lowering:>12.2f} {hf['save']:>17.2f} "
              f"{hf['load']:>17.2f} {save / hf['save']:>9.2f} {load / hf['load']:>9.2f} "
              f"{mib:>7.1f} {hf['mib']:>7.1f}  {'yes' if same else 'NO'}")
    print("\n(lowering s): the part of slimfx load spent converting weights for CPU kernels in "
          "CompiledModel.__init__ (runtime/lower.py), not reading the artifact (median per run).")


if __name__ == "__main__":
    main()
