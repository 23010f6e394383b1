"""Weight-only quantization of SmolLM2-135M-Instruct and all-MiniLM-L6-v2: size vs quality.

Every row compiles the blocks' linears (`blocks.*.** : Linear`; embeddings and the tied head stay
fp32) and scores perplexity on the same tokens of evaluation.default_text(). Calibration uses
other tokens of the same text (24 chunks of 128 tokens after the scored ones). Prints a markdown
table and the checks; exits non-zero if a check fails.

    .venv/bin/python benchmarks/precision.py [--max-tokens 1024] [--rows fp32,int8,...]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import slimfx

from slimfx.evaluation import default_text, embedding_cosine, param_bytes, perplexity
from slimfx.models import load

LINEARS = "blocks.*.** : Linear"
CHOICES = "{int8, int4 group=64, int4 group=64 sym=false, int4 group=32 sym=false}"
ROWS = {  # name -> rule (None: the fp32 model itself)
    "fp32": None,
    "int8 per-channel RTN": f"quantize {LINEARS} int8",
    "int4 g64 RTN sym": f"quantize {LINEARS} int4 group=64",
    "int4 g64 RTN asym": f"quantize {LINEARS} int4 group=64 sym=false",
    "int4 g64 RTN sym clip=mse": f"quantize {LINEARS} int4 group=64 clip=mse",
    "int4 g64 RTN sym clip=output": f"quantize {LINEARS} int4 group=64 clip=output",
    "int4 g64 GPTQ": f"quantize {LINEARS} int4 group=64 method=gptq act_order=true",
    "int4 g64 GPTQ sequential=false": f"quantize {LINEARS} int4 group=64 method=gptq act_order=true sequential=false",
    "int4 g64 GPTQ clip=output": f"quantize {LINEARS} int4 group=64 method=gptq act_order=true clip=output",
    "int4 g64 GPTQ asym clip=output": f"quantize {LINEARS} int4 group=64 sym=false method=gptq act_order=true "
                                      "clip=output",
    "int4 g64 GPTQ asym zero=float clip=output": f"quantize {LINEARS} int4 group=64 sym=false zero=float method=gptq "
                                                 "act_order=true clip=output",
    "int4 g32 GPTQ": f"quantize {LINEARS} int4 group=32 method=gptq act_order=true",
    # SmolLM2's weights are a dequantized Q4_1 file (groups of 32 with a float offset): this format
    # reproduces them almost exactly, so judge formats at group 64, not by this row.
    "int4 g32 RTN asym zero=float (source format)": f"quantize {LINEARS} int4 group=32 sym=false zero=float",
    "budget avg_bits<=4.5": f"precision {LINEARS} choose {CHOICES} budget avg_bits<=4.5 by output_mse method=gptq act_order=true",
    "budget avg_bits<=5.0": f"precision {LINEARS} choose {CHOICES} budget avg_bits<=5.0 by output_mse method=gptq act_order=true",
}
MINILM_ROWS = {"int8": f"quantize {LINEARS} int8", "int4 g32": f"quantize {LINEARS} int4 group=32"}
SENTENCES = ["The cat sits on the mat.", "Quantization shrinks neural network weights.",
             "A compiler rewrites programs into faster ones.", "It rained all day in the city.",
             "Transformers attend to every token in the sequence.", "Paris is the capital of France."]


def calibration(loaded, skip: int, chunks: int = 24, length: int = 128) -> list[dict[str, torch.Tensor]]:
    """`chunks` windows of `length` tokens of default_text after the first `skip` (the scored ones)."""
    ids = torch.as_tensor(loaded.tokenizer(default_text(), return_tensors="pt")["input_ids"]).reshape(-1)
    windows = ids[skip:skip + chunks * length].view(chunks, length)
    return [{"input_ids": w[None], "attention_mask": torch.ones(1, length, dtype=torch.long)} for w in windows]


def policy(rule: str) -> str:
    return f"policy bench {{\n    {rule}\n}}\n"


def stored_bytes(model) -> int:
    """The model's weights as stored: a compiled model's packed weights without the copies the CPU
    kernels convert them to (runtime/lower.py counts those apart), else every parameter."""
    return model.weight_bytes() if hasattr(model, "weight_bytes") else param_bytes(model)


def bits_per_weight(cm) -> float:
    """All-in bits over the rule's weights, as the pass measured them."""
    return cm.report.rules[0].details["bits_per_weight"]


def smollm_rows(names: list[str], max_tokens: int) -> list[dict]:
    loaded = load("smollm2-135m")
    text = default_text()
    calib = calibration(loaded, skip=max_tokens)
    rows = []
    for name in names:
        start = time.perf_counter()
        rule = ROWS[name]
        model = loaded.model if rule is None else slimfx.compile(loaded, policy(rule), calib=calib)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, loaded.tokenizer, text, max_tokens=max_tokens)
        details = {} if rule is None else model.report.rules[0].details
        rows.append({"name": name, "bytes": stored_bytes(model), "bits": details.get("bits_per_weight", 32.0),
                     "ppl": ppl, "compile_s": seconds, "sensitivity": details.get("sensitivity")})
        print(f"  {name}: ppl {ppl:.3f} ({seconds:.0f} s compile)", file=sys.stderr, flush=True)
    return rows


def minilm_rows() -> list[dict]:
    loaded = load("minilm-l6")
    rows = []
    for name, rule in MINILM_ROWS.items():
        cm = slimfx.compile(loaded, policy(rule))
        cos = embedding_cosine(loaded.model, cm, loaded.tokenizer, SENTENCES)
        rows.append({"name": name, "bytes": stored_bytes(cm), "bits": bits_per_weight(cm), "cosine": cos})
    return rows


def table(rows: list[dict]) -> str:
    fp32 = next((r["ppl"] for r in rows if r["name"] == "fp32"), None)
    out = ["| SmolLM2-135M | weight MiB | bits/weight (quantized linears) | ppl | ppl / fp32 | compile s |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ppl'] / fp32:.4f}" if fp32 else "-"
        out.append(f"| {r['name']} | {r['bytes'] / 2**20:.1f} | {r['bits']:.3f} | {r['ppl']:.3f} | {ratio} | "
                   f"{r['compile_s']:.0f} |")
    return "\n".join(out)


def minilm_table(rows: list[dict], fp32_bytes: int) -> str:
    out = ["| all-MiniLM-L6-v2 | weight MiB | bits/weight | mean cosine to fp32 |", "|---|---:|---:|---:|",
           f"| fp32 | {fp32_bytes / 2**20:.1f} | 32.000 | 1.0000 |"]
    out += [f"| {r['name']} | {r['bytes'] / 2**20:.1f} | {r['bits']:.3f} | {r['cosine']:.4f} |" for r in rows]
    return "\n".join(out)


def checks(rows: list[dict]) -> list[tuple[str, bool]]:
    by = {r["name"]: r for r in rows}
    out = []
    if "fp32" not in by:
        return out
    fp32 = by["fp32"]["ppl"]
    if "int8 per-channel RTN" in by:
        out.append(("int8 ppl within 1% of fp32", by["int8 per-channel RTN"]["ppl"] <= 1.01 * fp32))
    if "int4 g64 GPTQ" in by and "int4 g64 RTN sym" in by:
        rtn, gq = by["int4 g64 RTN sym"]["ppl"] - fp32, by["int4 g64 GPTQ"]["ppl"] - fp32
        out.append((f"GPTQ g64 ppl increase ({gq:.3f}) <= half of RTN g64's ({rtn:.3f})", gq <= rtn / 2))
    if "int4 g64 GPTQ" in by and "int4 g64 GPTQ sequential=false" in by:
        seq, flat = by["int4 g64 GPTQ"]["ppl"] - fp32, by["int4 g64 GPTQ sequential=false"]["ppl"] - fp32
        out.append((f"sequential GPTQ g64 ppl increase ({seq:.3f}) <= 2/3 of sequential=false's ({flat:.3f})",
                    seq <= 2 * flat / 3))
    for searched, plain in (("int4 g64 RTN sym clip=mse", "int4 g64 RTN sym"),
                            ("int4 g64 RTN sym clip=output", "int4 g64 RTN sym"),
                            ("int4 g64 GPTQ clip=output", "int4 g64 GPTQ")):
        if searched in by and plain in by:
            a, b = by[searched]["ppl"], by[plain]["ppl"]
            out.append((f"{searched} ppl {a:.3f} <= {plain}'s {b:.3f} (range search)", a <= b))
    uniform = [r for n, r in by.items() if n != "fp32" and not n.startswith("budget")]
    for n, r in by.items():
        if n.startswith("budget"):
            limit = float(n.rsplit("<=", 1)[1])  # "budget avg_bits<=4.5"
            fit = [u for u in uniform if u["bits"] <= limit + 1e-9]
            best = min(fit, key=lambda u: u["ppl"], default=None)
            if best is not None:
                out.append((f"{n} ppl {r['ppl']:.3f} <= best uniform format of <= {limit:g} bits/weight "
                            f"({best['name']}, {best['ppl']:.3f})", r["ppl"] <= best["ppl"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--no-minilm", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = smollm_rows(args.rows.split(","), args.max_tokens)
    print(f"\nSmolLM2-135M-Instruct, perplexity on the first {args.max_tokens} tokens of default_text(); "
          "calibration 24 x 128 other tokens\n")
    print(table(rows))
    if not args.no_minilm:
        fp32 = param_bytes(load("minilm-l6").model)
        print()
        print(minilm_table(minilm_rows(), fp32))
    results = checks(rows)
    print("\nchecks:")
    for what, ok in results:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
