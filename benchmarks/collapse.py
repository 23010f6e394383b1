"""Depth pruning of SmolLM2-135M-Instruct (30 blocks): size vs quality, and what healing buys.

Removes 4 and 8 blocks with every method of the collapse pass — rear drop, drop by block
influence, drop by angular distance (runs of at most 4), LaCo's search — each plain and (except
rear drop) with `heal method=linear`; then the best of them with `heal method=linear` followed by `heal
method=lora … distill=true`. Perplexity on evaluation.eval_text() (the same tokens for every
row); calibration is compile's default (the other part of the built-in text, 3,072 tokens), or
with --calib-tokens N that many tokens of built-in text (the default's, then standard-library
docstrings the eval text does not hold: calibration.py), so no row is scored on text it was
fitted or trained on. CPU latency of one 1×256 forward, each row
against the fp32 model measured in the same run. Prints a markdown table, then the checks.

--eval-text FILE and --calib-text FILE score and calibrate on your own text instead (paragraphs
separated by blank lines, as `slimfx compile --calib` reads them): the issue's prototype figures
were measured on other text than the built-in docstrings, and how much a cut costs depends on the
text (benchmarks/README.md, collapse section: news text).

    .venv/bin/python benchmarks/collapse.py [--sizes 4,8] [--max-tokens 2048] [--lora-steps 40]
        [--lora-reach 1] [--lora-schedule cosine] [--methods rear,influence,angular,laco]
        [--generate TOKENS] [--calib-tokens N | --calib-text FILE] [--eval-text FILE]
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
from slimfx.calibration import calibration_batches, read_paragraphs
from slimfx.dsl.schema import SCHEMAS
from slimfx.evaluation import eval_text, latency_ms, param_bytes, perplexity
from slimfx.models import load
from slimfx.passes.collapse.teacher_text import written_batch_count

METHODS = {  # name -> the rule that removes n blocks
    "rear drop": lambda n: f"drop blocks[-{n}:]",
    "drop by influence": lambda n: f"drop blocks auto(count={n})",
    "drop by angular distance": lambda n: f"drop blocks auto(count={n}, score=angular, max_run=4)",
    # LaCo's own span (4: three blocks merged into one per step) keeps no merge on SmolLM2: the
    # merged block's final hidden states have cosine ≈ 0 to the original's. Span 2 is kept.
    "LaCo search": lambda n: f"collapse blocks auto(count={n}, span=2, threshold=0.5)",
}
SHORT = {"rear drop": "rear", "drop by influence": "influence", "drop by angular distance": "angular",
         "LaCo search": "laco"}
LINEAR = "heal method=linear"
# The rule's own defaults: written out only when asked otherwise, so the default rows keep their rule.
REACH, SCHEDULE = SCHEMAS["heal"]["reach"].default, SCHEMAS["heal"]["schedule"].default


def lora(steps: int, generate: int = 0, reach: int = REACH, schedule: str = SCHEDULE) -> str:
    return (f"heal method=lora steps={steps} lr=0.001 rank=8 distill=true" + (f" reach={reach}" if reach != REACH else "")
            + (f" schedule={schedule}" if schedule != SCHEDULE else "") + (f" generate={generate}" if generate else ""))


def measure(lm, rules: str | None, tokens: int, example: dict, base_ms: float | None, calib=None,
            text: str | None = None) -> dict:
    start = time.perf_counter()
    model = lm.model if rules is None else slimfx.compile(lm, rules, calib=calib)
    seconds = time.perf_counter() - start
    ppl = perplexity(model, lm.tokenizer, text or eval_text(), max_tokens=tokens)
    ms = latency_ms(model, example, repeats=5, warmup=1)
    notes = [] if rules is None else [n for r in model.report.rules for n in r.notes[:1]]
    blocks = len(model.graph.blocks) if rules is not None else lm.model.config.num_hidden_layers
    return {"rules": rules or "(fp32)", "ppl": ppl, "bytes": param_bytes(model), "blocks": blocks,
            "compile_s": seconds if rules else 0.0, "ms": ms, "notes": notes}


def table(rows: list[dict], base: dict) -> str:
    out = ["| removed | method | heal | blocks | perplexity | × fp32 | weight bytes × | 1×256 CPU latency × | compile s |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.get('n', 0)} | {r.get('method', 'fp32')} | {r.get('heal', '')} | {r['blocks']} | "
                   f"{r['ppl']:.2f} | {r['ppl'] / base['ppl']:.3f} | {r['bytes'] / base['bytes']:.3f} | "
                   f"{r['ms'] / base['ms']:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(out)


def _eval_text(path: str) -> str:
    """The text of an eval file, its paragraphs' whitespace normalized as calibration reads them."""
    return "\n\n".join(read_paragraphs(path, what="eval text"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4,8")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--lora-steps", type=int, default=40)
    ap.add_argument("--lora-reach", type=int, default=REACH,
                    help="the LoRA heal's reach= (adapters on the blocks this many from each cut, each side)")
    ap.add_argument("--lora-schedule", choices=SCHEMAS["heal"]["schedule"].choices, default=SCHEDULE,
                    help="the LoRA heal's schedule= (cosine: warm-up, then decay towards 0)")
    ap.add_argument("--generate", type=int, default=0, help="the LoRA heal's generate= (tokens the model writes)")
    ap.add_argument("--methods", default=",".join(SHORT.values()))
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--calib-tokens", type=int, default=None,
                       help="calibrate every compile on this many tokens of built-in text (default: compile's 3,072)")
    source.add_argument("--calib-text", default=None,
                       help="calibrate every compile on this text file's paragraphs (blank-line separated)")
    ap.add_argument("--eval-text", default=None,
                    help="score perplexity on this text file instead of the built-in eval text")
    args = ap.parse_args()
    try:  # a file that cannot be read is refused before the model loads, by name
        text = _eval_text(args.eval_text) if args.eval_text else eval_text()
        calib = read_paragraphs(args.calib_text) if args.calib_text else args.calib_tokens
    except ValueError as e:
        ap.error(str(e))
    asked = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in asked if m not in SHORT.values()]:
        ap.error(f"unknown --methods {unknown}; known: {', '.join(SHORT.values())}")
    chosen = [m for m in METHODS if SHORT[m] in asked]
    if all(m == "rear drop" for m in chosen):  # the LoRA row heals the best linear-healed row: there was none
        ap.error("--methods needs one method besides rear (rear drop is not healed)")
    torch.manual_seed(0)
    started = time.perf_counter()
    lm = load("smollm2-135m")
    if args.generate:  # the heal refuses steps that stop short of the written text: say so before any row runs
        needed = len(calibration_batches(lm, calib)) + written_batch_count(lm.model, args.generate)
        if args.lora_steps < needed:
            ap.error(f"--generate {args.generate} fills batches up to step {needed}: give --lora-steps {needed} or more")
    example = lm.encode([text], max_length=256)
    slimfx.plan(lm, "")  # the export, cached: the first compiled row's time included it, the others not
    base = measure(lm, None, args.max_tokens, example, None, text=text)
    print(f"fp32: perplexity {base['ppl']:.3f}, {base['ms']:.1f} ms per 1×256 forward", flush=True)
    rows = [base]
    checks = []
    for n in [int(s) for s in args.sizes.split(",")]:
        sized = []
        for method in chosen:
            for heal in ("",) if method == "rear drop" else ("", "linear"):  # rear: thousands either way
                rules = METHODS[method](n) + (f"\n{LINEAR}" if heal else "")
                row = {**measure(lm, rules, args.max_tokens, example, base["ms"], calib, text), "n": n, "method": method,
                       "heal": heal or "none"}
                print(f"{n} {method} heal={row['heal']}: ×{row['ppl'] / base['ppl']:.3f} ({row['compile_s']:.0f} s) "
                      f"{'; '.join(row['notes'])}", flush=True)
                sized.append(row)
        best = min((r for r in sized if r["heal"] == "linear"), key=lambda r: r["ppl"])
        rules = f"{METHODS[best['method']](n)}\n{LINEAR}\n{lora(args.lora_steps, args.generate, args.lora_reach, args.lora_schedule)}"
        written = f", {args.generate:,} tokens written by the model" if args.generate else ""
        options = (f", reach {args.lora_reach}" if args.lora_reach != REACH else "") + (
            f", {args.lora_schedule} lr" if args.lora_schedule != SCHEDULE else "")
        row = {**measure(lm, rules, args.max_tokens, example, base["ms"], calib, text), "n": n, "method": best["method"],
               "heal": f"linear + lora ({args.lora_steps} steps{options}, distill{written})"}
        print(f"{n} {best['method']} heal=linear+lora: ×{row['ppl'] / base['ppl']:.3f} ({row['compile_s']:.0f} s) "
              f"{'; '.join(row['notes'])}", flush=True)
        sized.append(row)
        rows += sized
        target = {4: 1.12, 8: 1.30}.get(n)
        best_all = min(sized, key=lambda r: r["ppl"])
        if target:
            checks.append((f"{n} blocks removed, best heal within ×{target} of fp32 "
                           f"(×{best_all['ppl'] / base['ppl']:.3f}, {best_all['method']} + {best_all['heal']})",
                           best_all["ppl"] / base["ppl"] <= target))
        proto = {4: 1.16, 8: 1.37}.get(n)
        if proto:
            checks.append((f"{n} blocks, heal method=linear at least as good as the prototype's ×{proto} "
                           f"(×{best['ppl'] / base['ppl']:.3f}, {best['method']})", best["ppl"] / base["ppl"] <= proto))
    print()
    print(f"SmolLM2-135M-Instruct, {args.max_tokens} eval tokens; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; run {time.perf_counter() - started:.0f} s; "
          f"eval text {args.eval_text or 'built-in'}; calibration "
          f"{args.calib_text or (f'{args.calib_tokens:,} tokens of built-in text' if args.calib_tokens else 'compile default')}")
    print(table(rows, base))
    print()
    for text, ok in checks:
        print(f"{'met' if ok else 'NOT MET'}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
