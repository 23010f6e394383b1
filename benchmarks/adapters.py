"""LoRA training on CPU, slimfx against PEFT: r=16, alpha 32 on every attention projection
(q, k, v, o) of SmolLM2-135M, the same model loaded once, measured in the same run.

* insertion: `slimfx.compile(loaded, "adapt blocks.*.attn.* : Linear lora rank=16 alpha=32")`
  with its torch.export capture (the capture cache cleared before each run) against
  `peft.get_peft_model(deepcopy(model), LoraConfig(r=16, lora_alpha=32, q/k/v/o, dropout 0))`
  (the deepcopy untimed); median of --compiles after one untimed warm-up that pays for imports.
  The row below it is one more compile that finds its capture in the in-process cache.
* step: forward + causal-LM loss + backward + AdamW step on one batch of 4 × 128 tokens of real
  text (slimfx.evaluation.calibration_texts), the same batch for every model. slimfx's lora_A
  start as copies of PEFT's (B = 0 in both), so both train the same numbers: "max |Δloss|" is
  the largest loss difference over all the steps both took. After --warmup steps each, the models
  take turns for --rounds rounds of --repeats steps (the machine may be shared); the time is the
  median over rounds of each model's median step. What the graph runs differently from HF eager:
  SDPA with a materialized [b,1,s,s] mask and K/V repeated to 9 heads (HF: is_causal, enable_gqa),
  and ~125 full-range aten.slice nodes (each a zeros + copy in backward) eager indexing skips.
* memory: each model in a fresh subprocess (this script with --memory-of, glibc's mmap threshold
  fixed at 128 KiB so a freed tensor leaves the RSS): load, insert the adapters (slimfx then drops
  the HF model: the compiled model owns copies), build the optimizer, read every weight once (HF
  maps part of them from the safetensors file), gc + malloc_trim, reset the peak RSS
  (`echo 5 > /proc/self/clear_refs`: compile's own peak is not counted), read the RSS as the
  baseline, run 3 training steps, read the peak (VmHWM). "step peak" is peak − baseline (grads,
  AdamW state, activations saved for backward, logits); "peak RSS" the peak itself. VmHWM, not
  getrusage: ru_maxrss of a child started from a big parent (vfork) starts at the parent's peak.
* QLoRA: the same adapters over an int4 g64 base on the attention projections (`quantize` before
  `adapt`, adapters unmerged); with a gradient wanted the quantized linears take the reference op.
* max |Δlogits|: eval-mode logits on the batch before any step, each model against PEFT's
  (with ‖Δ‖/‖PEFT‖ for QLoRA, whose base differs by its int4 rounding).

    .venv/bin/python benchmarks/adapters.py [--quick] [--rounds 5] [--repeats 2] [--compiles 3] [--threads N] [--profile]
"""
from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where kernels.py would shadow the `kernels` package
# transformers imports when it is installed ("cannot import name 'CUDAProperties'"): off it goes.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse
import copy
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

ADAPT = "adapt blocks.*.attn.* : Linear lora rank=16 alpha=32"
POLICIES = {"slimfx": ADAPT, "qlora": f"quantize blocks.*.attn.* : Linear int4 group=64\n    {ADAPT}"}
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, TOKENS, LR, MEMORY_STEPS = 4, 128, 1e-3, 3


def policy(rules: str) -> str:
    return f"policy bench {{\n    {rules}\n}}\n"


def text_batch(loaded) -> dict[str, torch.Tensor]:
    """The first 4 × 128 tokens of the calibration paragraphs, as 4 rows with no padding."""
    from slimfx.evaluation import calibration_texts

    ids = loaded.tokenizer("\n\n".join(calibration_texts()), return_tensors="pt")["input_ids"]
    ids = torch.as_tensor(ids).reshape(-1)[:BATCH * TOKENS].reshape(BATCH, TOKENS)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def peft_model(model):
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=PEFT_TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


class Trainee:
    """One model with its optimizer; `step()` is one timed unit of training."""

    def __init__(self, model, params, call_kw: dict):
        self.model, self.params, self.call_kw = model, list(params), call_kw
        self.opt = torch.optim.AdamW(self.params, lr=LR)
        self.losses: list[float] = []

    def logits(self, batch) -> torch.Tensor:
        return self.model(**batch, **self.call_kw).logits

    def step(self, batch) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        logits = self.logits(batch)
        ids = batch["input_ids"]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())
        return self.losses[-1]


def build(name: str, loaded, *, keep_original: bool = True) -> Trainee:
    """"peft" wraps (a deepcopy of) the HF model; "slimfx"/"qlora" compile the loaded model."""
    import slimfx

    if name == "peft":
        model = peft_model(copy.deepcopy(loaded.model) if keep_original else loaded.model)
        return Trainee(model, [p for p in model.parameters() if p.requires_grad], {"use_cache": False})
    cm = slimfx.compile(loaded, policy(POLICIES[name]))
    return Trainee(cm, cm.adapter_parameters(), {})


def copy_init(src: Trainee, dst: Trainee) -> None:
    """Give slimfx's lora_A PEFT's initial values (lora_B is zero in both)."""
    peft_params = dict(src.model.named_parameters())
    with torch.no_grad():
        for name, p in dst.model.program.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                path, _, part = name.rpartition(".")
                p.copy_(peft_params[f"base_model.model.{path}.{part}.default.weight"])


# ---- insertion time ----------------------------------------------------------------------------

def insertion_seconds(loaded, repeats: int, names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(name -> median seconds to insert the adapters, after one untimed warm-up each;
    name -> seconds of one slimfx compile whose capture comes from the in-process cache)."""
    from slimfx.passes.capture_cache import clear_cache

    def timed(name: str, cached: bool = False) -> float:
        if not cached:
            clear_cache()
        model = copy.deepcopy(loaded.model) if name == "peft" else None
        gc.collect()
        start = time.perf_counter()
        if name == "peft":
            peft_model(model)
        else:
            build(name, loaded)
        return time.perf_counter() - start

    out, cached = {}, {}
    for name in names:
        timed(name)
        out[name] = statistics.median(timed(name) for _ in range(repeats))
        if name != "peft":
            cached[name] = timed(name, cached=True)
        print(f"insertion {name}: {out[name]:.2f} s (capture cached: {cached.get(name)})", file=sys.stderr)
    return out, cached


# ---- memory (one subprocess per model) ---------------------------------------------------------

def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(name: str) -> None:
    """Runs in a fresh process: prints {"base": MiB, "peak": MiB} of MEMORY_STEPS training steps."""
    from slimfx.models import load
    from slimfx.passes.capture_cache import clear_cache

    loaded = load("smollm2-135m")
    batch = text_batch(loaded)
    trainee = build(name, loaded, keep_original=False)
    del loaded
    clear_cache()
    with torch.no_grad():  # fault in weights still mapped from the safetensors file (HF's load)
        for t in [*trainee.model.parameters(), *trainee.model.buffers()]:
            t.sum()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = rss_kib("VmRSS")
    for _ in range(MEMORY_STEPS):
        trainee.step(batch)
    print(json.dumps({"base": base / 1024, "peak": rss_kib("VmHWM") / 1024}))


def memory_mib(name: str) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # fixed: freed tensors leave the RSS
    threads = ["--threads", str(torch.get_num_threads())]
    done = subprocess.run([sys.executable, __file__, "--memory-of", name, *threads], capture_output=True,
                          text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"memory subprocess for {name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"memory {name}: {result}", file=sys.stderr)
    return result


# ---- step time ---------------------------------------------------------------------------------

def step_ms(trainees: dict[str, Trainee], batch, warmup: int, rounds: int, repeats: int) -> dict[str, float]:
    """name -> median over rounds of the median step time (ms); models take turns each round, in
    reversed order every other round (a profile shows the memory-bound ops of whichever model runs
    second in a process slower, on both sides)."""
    for t in trainees.values():
        for _ in range(warmup):
            t.step(batch)
    times: dict[str, list[float]] = {name: [] for name in trainees}
    for r in range(rounds):
        order = list(trainees.items())
        for name, t in order if r % 2 == 0 else order[::-1]:  # who goes first alternates
            steps = []
            for _ in range(repeats):
                start = time.perf_counter()
                t.step(batch)
                steps.append((time.perf_counter() - start) * 1e3)
            times[name].append(statistics.median(steps))
    return {name: statistics.median(ts) for name, ts in times.items()}


def max_logit_diff(trainees: dict[str, Trainee], batch) -> dict[str, float]:
    with torch.no_grad():
        logits = {}
        for name, t in trainees.items():
            t.model.eval()
            logits[name] = t.logits(batch)
    ref = logits["peft"]
    return {name: (float((v - ref).abs().max()), float((v - ref).norm() / ref.norm())) for name, v in logits.items()}


def profile(trainees: dict[str, Trainee], batch, rows: int = 25) -> None:
    """One profiled step per model: top ops by self CPU time (after the timed steps: warm)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, t in trainees.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t.step(batch)
        print(f"\n### profile: {name} (one step, top {rows} by self CPU time)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ---- report ------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}), load average {os.getloadavg()[0]:.1f}")


def table(ins: dict, cached: dict, ms: dict, mem: dict, dlogits: dict, dloss: float) -> list[str]:
    def row(label, v, fmt):
        return (f"| {label} | {v['peft']:{fmt}} | {v['slimfx']:{fmt}} | {v['slimfx'] / v['peft']:.2f} | "
                f"{v['qlora']:{fmt}} | {v['qlora'] / v['peft']:.2f} | {v['qlora'] / v['slimfx']:.2f} |")

    steps = {n: mem[n]["peak"] - mem[n]["base"] for n in mem}
    lines = ["| measure | PEFT | slimfx | slimfx ÷ PEFT | QLoRA (slimfx int4) | QLoRA ÷ PEFT | QLoRA ÷ slimfx |",
             "|---|---:|---:|---:|---:|---:|---:|",
             row("insert adapters (s)", ins, ".2f"),
             f"| insert, capture from the cache (s) | | {cached['slimfx']:.2f} | | "
             f"{cached['qlora']:.2f} | | |",
             row(f"train step {BATCH}×{TOKENS} (ms)", ms, ".0f"),
             row("step peak over base (MiB)", steps, ".0f"),
             row("peak RSS (MiB)", {n: mem[n]["peak"] for n in mem}, ".0f"),
             f"| max \\|Δlogits\\| vs PEFT | 0 | {dlogits['slimfx'][0]:.2e} | | {dlogits['qlora'][0]:.2e} "
             f"(rel {dlogits['qlora'][1]:.1e}) | | |",
             f"| max \\|Δloss\\| vs PEFT, all steps | 0 | {dloss:.2e} | | | | |"]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 compile, 2 rounds x 2 steps, 1 warm-up")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="steps per model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compiles", type=int, default=3, help="timed insertions per model")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table per model")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.rounds, args.repeats, args.compiles) < 1 or args.warmup < 0:  # a median of nothing, later
        ap.error("--rounds, --repeats and --compiles must be at least 1, --warmup at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        memory_child(args.memory_of)
        return 0
    if args.quick:
        args.rounds, args.repeats, args.warmup, args.compiles = 2, 2, 1, 1
    names = ["peft", "slimfx", "qlora"]
    began = time.perf_counter()

    mem = {name: memory_mib(name) for name in names}
    from slimfx.models import load

    torch.manual_seed(0)
    loaded = load("smollm2-135m")
    batch = text_batch(loaded)
    ins, cached = insertion_seconds(loaded, args.compiles, names)
    torch.manual_seed(0)
    trainees = {name: build(name, loaded) for name in names}
    copy_init(trainees["peft"], trainees["slimfx"])
    copy_init(trainees["peft"], trainees["qlora"])
    dlogits = max_logit_diff(trainees, batch)
    header = machine()
    ms = step_ms(trainees, batch, args.warmup, args.rounds, args.repeats)
    header += f" before timing steps, {os.getloadavg()[0]:.1f} after"
    pairs = zip(trainees["peft"].losses, trainees["slimfx"].losses)
    dloss = max(abs(a - b) for a, b in pairs)

    print(f"SmolLM2-135M, LoRA r=16 alpha=32 on q/k/v/o of all 30 blocks, AdamW lr {LR}, batch {BATCH}×{TOKENS}\n"
          f"{header}\nsteps: {args.warmup} warm-up + {args.rounds} rounds × {args.repeats} per model; "
          f"insertion: median of {args.compiles}; memory: fresh process per model, {MEMORY_STEPS} steps\n")
    print("\n".join(table(ins, cached, ms, mem, dlogits, dloss)))
    if args.profile:
        profile(trainees, batch)
    ratio = ms["slimfx"] / ms["peft"]
    verdict = "target met" if ratio <= 1.1 else "MISSED"
    print(f"\n{verdict}: slimfx step time is {ratio:.2f}× PEFT's (target ≤ 1.10×); run took "
          f"{time.perf_counter() - began:.0f} s")
    return 0 if ratio <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
