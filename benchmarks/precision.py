"""Weight-only quantization of SmolLM2-135M-Instruct and all-MiniLM-L6-v2: size vs quality.

Every row compiles the blocks' linears (`blocks.*.** : Linear`; embeddings and the tied head stay
fp32) and scores perplexity on the same tokens of evaluation.default_text(). Calibration uses
other tokens of the same text (24 chunks of 128 tokens after the scored ones). Prints a markdown
table and the checks; exits non-zero if a check fails.

Memory: "compile peak" is the peak RSS during compile() over the RSS before it (the fp32 model
loaded, its export cached); "peak over the result" subtracts what the compiled model still holds
after compile, leaving compile's working set beyond its input and output (the issue's bound: two
blocks' worth, a check).

    .venv/bin/python benchmarks/precision.py [--max-tokens 1024] [--rows fp32,int8,...]
        [--peer ["int4 g64 GPTQ,int4 g32 GPTQ asym"]]

`--peer` adds llm-compressor's GPTQ on the same model, scheme and calibration tokens, run by
benchmarks/peer_gptq.py in its own venv (`bash benchmarks/peer_venv.sh` makes .venv-peer), scored
by the same perplexity call, beside slimfx's row of the same scheme (`--rows ""` runs only those).
"""
from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where kernels.py would shadow the `kernels` package
# transformers imports when it is installed ("cannot import name 'CUDAProperties'"): off it goes.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse
import copy
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import slimfx

from slimfx.evaluation import default_text, embedding_cosine, param_bytes, perplexity
from slimfx.models import load
from slimfx.runtime.heap import return_freed_heap

LINEARS = "blocks.*.** : Linear"
CHOICES = "{int8, int4 group=64, int4 group=64 sym=false, int4 group=32 sym=false}"
# With float zero points (`zero=float`) among the candidates; group 32 left out, since it reproduces
# the fixture's own Q4_1 weights (see "source format" below) and would not judge the solver.
CHOICES_FLOAT = ("{int8, int4 group=128 sym=false zero=float, int4 group=64, int4 group=64 sym=false zero=float, "
                 "int4 group=32 sym=false}")
SOURCE_FORMAT = "int4 g32 RTN asym zero=float (source format)"
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
    SOURCE_FORMAT: f"quantize {LINEARS} int4 group=32 sym=false zero=float",
    "int4 g64 GPTQ clip=output true_sequential": f"quantize {LINEARS} int4 group=64 method=gptq act_order=true "
                                                 "clip=output true_sequential=true",
    # Adapters from the quantization error (EoRA): their bytes (fp32, or fp16 with dtype=fp16) count in
    # "weight MiB" only.
    "int4 g64 GPTQ clip=output + init=error r32": f"quantize {LINEARS} int4 group=64 method=gptq act_order=true "
                                                  f"clip=output\n    adapt {LINEARS} lora rank=32 alpha=32 init=error",
    "int4 g64 GPTQ clip=output + init=error r32 fp16": f"quantize {LINEARS} int4 group=64 method=gptq act_order=true "
                                                       f"clip=output\n    adapt {LINEARS} lora rank=32 alpha=32 "
                                                       "init=error dtype=fp16",
    "int2 g64 GPTQ": f"quantize {LINEARS} int2 group=64 method=gptq act_order=true",
    "int2 g64 GPTQ + init=error r32": f"quantize {LINEARS} int2 group=64 method=gptq act_order=true\n    "
                                      f"adapt {LINEARS} lora rank=32 alpha=32 init=error",
    # int2 with four levels over each group's own range (a float offset) instead of symmetric ones
    "int2 g64 GPTQ asym zero=float clip=output": f"quantize {LINEARS} int2 group=64 sym=false zero=float method=gptq "
                                                 "act_order=true clip=output",
    "int2 g64 GPTQ asym zero=float clip=output + init=error r32 fp16": (
        f"quantize {LINEARS} int2 group=64 sym=false zero=float method=gptq act_order=true clip=output\n    "
        f"adapt {LINEARS} lora rank=32 alpha=32 init=error dtype=fp16"),
    # refit=true: each group's scale and float offset solved for the codes GPTQ chose
    "int4 g64 GPTQ clip=output refit": f"quantize {LINEARS} int4 group=64 method=gptq act_order=true clip=output "
                                       "refit=true",
    "int2 g64 GPTQ asym zero=float clip=output refit": f"quantize {LINEARS} int2 group=64 sym=false zero=float "
                                                       "method=gptq act_order=true clip=output refit=true",
    "int2 g64 GPTQ asym zero=float clip=output refit + init=error r32 fp16": (
        f"quantize {LINEARS} int2 group=64 sym=false zero=float method=gptq act_order=true clip=output refit=true\n    "
        f"adapt {LINEARS} lora rank=32 alpha=32 init=error dtype=fp16"),
    "budget avg_bits<=4.5 by fisher": f"precision {LINEARS} choose {CHOICES} budget avg_bits<=4.5 by fisher method=gptq "
                                      "act_order=true",
    "budget avg_bits<=4.5": f"precision {LINEARS} choose {CHOICES} budget avg_bits<=4.5 by output_mse method=gptq act_order=true",
    "budget avg_bits<=5.0": f"precision {LINEARS} choose {CHOICES} budget avg_bits<=5.0 by output_mse method=gptq act_order=true",
    "budget avg_bits<=4.5 float zeros": f"precision {LINEARS} choose {CHOICES_FLOAT} budget avg_bits<=4.5 by output_mse "
                                        "method=gptq act_order=true clip=output",
    "budget avg_bits<=5.0 float zeros": f"precision {LINEARS} choose {CHOICES_FLOAT} budget avg_bits<=5.0 by output_mse "
                                        "method=gptq act_order=true clip=output",
}
# scheme -> (slimfx rule, peer_gptq.py arguments); rules of a ROWS name are run once when both ask.
PEER_SCHEMES = {
    "int4 g64 GPTQ": (ROWS["int4 g64 GPTQ"], ["--group", "64"]),
    "int4 g32 GPTQ": (ROWS["int4 g32 GPTQ"], ["--group", "32"]),
    "int4 g64 GPTQ asym": (f"quantize {LINEARS} int4 group=64 sym=false method=gptq act_order=true",
                           ["--group", "64", "--asym"]),
    "int4 g32 GPTQ asym": (f"quantize {LINEARS} int4 group=32 sym=false method=gptq act_order=true",
                           ["--group", "32", "--asym"]),
}
ROOT = Path(__file__).resolve().parents[1]
PEER_VENV = ROOT / ".venv-peer"
PEER_SCRIPT = Path(__file__).resolve().parent / "peer_gptq.py"
# Rows whose adapters then train (slimfx.train, loss="distill" against the fp32 model's logits,
# AdamW lr 2e-4) on the calibration windows, four per batch: name -> (the row compiled, steps).
# Training is not part of the int2 target ("no training"); these rows show what a few
# steps add. "compile s" is the compile alone; the training seconds are printed below the table.
TRAIN_LR, TRAIN_BATCH = 2e-4, 4
TRAINED = {
    # (no comma in a name: --rows splits on commas)
    "int2 g64 GPTQ asym zero=float clip=output refit + init=error r32 fp16 + 48 distill steps": (
        "int2 g64 GPTQ asym zero=float clip=output refit + init=error r32 fp16", 48),
}

# Rows compiled on every whole calibration window the eval does not read (47 of 128 tokens with
# the default 1,024 eval tokens: 6,016 tokens) instead of the shared 24: name -> the row compiled.
# The drift targets of `init=error` in the sweep are regressions on the calibration rows, and 3,072
# rows for a 1,536-wide input overfit (int2 without refit: x2.11 of fp32 on 24 windows, x1.87 on 47).
ALL_WINDOWS = {
    "int2 g64 GPTQ asym zero=float clip=output + init=error r32 fp16 + all calibration windows": (
        "int2 g64 GPTQ asym zero=float clip=output + init=error r32 fp16"),
    "int2 g64 GPTQ asym zero=float clip=output refit + init=error r32 fp16 + all calibration windows": (
        "int2 g64 GPTQ asym zero=float clip=output refit + init=error r32 fp16"),
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


def every_window(loaded, skip: int, length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Every whole `length`-token window of default_text after the first `skip` (ALL_WINDOWS rows)."""
    tokens = len(loaded.tokenizer(default_text())["input_ids"])
    return calibration(loaded, skip, chunks=(tokens - skip) // length, length=length)


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
    slimfx.plan(loaded, "")  # the export, cached: no row's peak includes it
    rows = []
    for name in names:
        rule = ROWS[TRAINED[name][0] if name in TRAINED else ALL_WINDOWS.get(name, name)]
        model, seconds, peak, held = (loaded.model, 0.0, 0.0, 0.0) if rule is None else \
            measured_compile(loaded, rule, every_window(loaded, max_tokens) if name in ALL_WINDOWS else calib)
        trained = train_row(model, loaded, calib, TRAINED[name][1]) if name in TRAINED else None
        ppl = perplexity(model, loaded.tokenizer, text, max_tokens=max_tokens)
        details = {} if rule is None else model.report.rules[0].details
        rows.append({"name": name, "bytes": stored_bytes(model), "bits": details.get("bits_per_weight", 32.0),
                     "ppl": ppl, "compile_s": seconds, "peak_mib": peak, "held_mib": held,
                     "sensitivity": details.get("sensitivity"), "trained": trained})
        print(f"  {name}: ppl {ppl:.3f} ({seconds:.0f} s compile, peak +{peak:.0f} MiB, result {held:.0f} MiB"
              + (f"; {trained}" if trained else "") + ")", file=sys.stderr, flush=True)
        del model
    return rows


def train_row(cm, loaded, calib, steps: int):
    """A TRAINED row's adapters distilled from the fp32 model on the calibration windows."""
    batches = [{k: torch.cat([c[k] for c in calib[i:i + TRAIN_BATCH]]) for k in calib[0]}
               for i in range(0, len(calib), TRAIN_BATCH)]
    return slimfx.train(cm, batches, steps=steps, lr=TRAIN_LR, loss="distill", teacher=loaded.model)


def measured_compile(loaded, rule: str, calib) -> tuple:
    """(compiled model, seconds, peak RSS during compile over the RSS before it, the RSS the
    compiled model holds after it over the same baseline; MiB). Peak − held is compile's working
    set beyond its input (the loaded model) and its output."""
    return_freed_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = rss_kib("VmRSS")
    start = time.perf_counter()
    cm = slimfx.compile(loaded, policy(rule), calib=calib)
    seconds = time.perf_counter() - start
    return_freed_heap()
    return cm, seconds, (rss_kib("VmHWM") - base) / 1024, (rss_kib("VmRSS") - base) / 1024


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def block_mib(loaded) -> tuple[float, float]:
    """(the fp32 model's parameter MiB, one block's), for the memory column's yardstick."""
    block = loaded.model.model.layers[0]
    return param_bytes(loaded.model) / 2**20, param_bytes(block) / 2**20


def peer_python() -> Path | None:
    python = PEER_VENV / "bin" / "python"
    return python if python.exists() else None


def with_weights(model, weights: dict[str, torch.Tensor]):
    """A copy of `model` whose parameters named in `weights` hold those tensors."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in weights.items():
            param = model.get_parameter(name)
            if param.shape != w.shape:
                raise ValueError(f"peer weight {name} is {tuple(w.shape)}, the model's {tuple(param.shape)}")
            param.copy_(w.to(param.dtype))
    return model


def run_peer(loaded, calib: list[dict[str, torch.Tensor]], args: list[str], python: Path) -> tuple[dict, dict]:
    """peer_gptq.py in the peer venv on the fp32 model and `calib`: (weights, its result.json)."""
    with tempfile.TemporaryDirectory(prefix="slimfx-peer-") as tmp:
        tmp = Path(tmp)
        loaded.model.save_pretrained(tmp / "model")
        loaded.tokenizer.save_pretrained(tmp / "model")
        torch.save(torch.cat([c["input_ids"] for c in calib]), tmp / "calib.pt")
        cmd = [str(python), str(PEER_SCRIPT), str(tmp / "model"), str(tmp / "calib.pt"), str(tmp / "out"), *args]
        subprocess.run(cmd, check=True, cwd=tmp, stdout=sys.stderr)  # its logs: keep stdout for the tables
        return (torch.load(tmp / "out" / "weights.pt", weights_only=True),
                json.loads((tmp / "out" / "result.json").read_text()))


def peer_rows(schemes: list[str], max_tokens: int, rows: list[dict]) -> list[dict]:
    """Each scheme by slimfx (reusing a row of the same name from `rows`) and by llm-compressor."""
    python = peer_python()
    if python is None:
        print(f"peer (llm-compressor) rows skipped: no {PEER_VENV.relative_to(ROOT)}; create it with "
              "`bash benchmarks/peer_venv.sh`")
        return []
    loaded = load("smollm2-135m")
    text = default_text()
    calib = calibration(loaded, skip=max_tokens)
    slimfx.plan(loaded, "")  # the export, cached, as in smollm_rows: no row's time includes it
    done = {r["name"]: r for r in rows}
    out = []
    for scheme in schemes:
        rule, args = PEER_SCHEMES[scheme]
        mine = done.get(scheme) if ROWS.get(scheme) == rule else None
        if mine is None:
            start = time.perf_counter()
            cm = slimfx.compile(loaded, policy(rule), calib=calib)
            seconds = time.perf_counter() - start  # the compile alone: the dict below scored first, then read the clock
            mine = {"ppl": perplexity(cm, loaded.tokenizer, text, max_tokens=max_tokens), "compile_s": seconds}
            del cm
        weights, result = run_peer(loaded, calib, args, python)
        ppl = perplexity(with_weights(loaded.model, weights), loaded.tokenizer, text, max_tokens=max_tokens)
        out.append({"name": scheme, "ppl": mine["ppl"], "compile_s": mine["compile_s"], "peer_ppl": ppl,
                    "peer_s": result["seconds"], "peer_linears": result["linears"],
                    "versions": result["versions"]})
        print(f"  {scheme}: slimfx ppl {mine['ppl']:.3f} ({mine['compile_s']:.0f} s), llm-compressor ppl "
              f"{ppl:.3f} ({result['seconds']:.0f} s, {result['linears']} linears)", file=sys.stderr, flush=True)
    return out


def peer_table(rows: list[dict]) -> str:
    out = ["| scheme | slimfx ppl | peer ppl | slimfx s | peer s |", "|---|---:|---:|---:|---:|"]
    out += [f"| {r['name']} | {r['ppl']:.3f} | {r['peer_ppl']:.3f} | {r['compile_s']:.0f} | {r['peer_s']:.0f} |"
            for r in rows]
    return "\n".join(out)


def minilm_rows() -> list[dict]:
    loaded = load("minilm-l6")
    rows = []
    for name, rule in MINILM_ROWS.items():
        cm = slimfx.compile(loaded, policy(rule))
        cos = embedding_cosine(loaded.model, cm, loaded.tokenizer, SENTENCES)
        rows.append({"name": name, "bytes": stored_bytes(cm), "bits": bits_per_weight(cm), "cosine": cos})
    return rows


def table(rows: list[dict], sizes: tuple[float, float]) -> str:
    fp32 = next((r["ppl"] for r in rows if r["name"] == "fp32"), None)
    model, block = sizes
    out = ["| SmolLM2-135M | weight MiB | bits/weight (quantized linears) | ppl | ppl / fp32 | compile s | "
           f"compile peak MiB (model {model:.0f}, block {block:.1f}) | peak over the result MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ppl'] / fp32:.4f}" if fp32 else "-"
        out.append(f"| {r['name']} | {r['bytes'] / 2**20:.1f} | {r['bits']:.3f} | {r['ppl']:.3f} | {ratio} | "
                   f"{r['compile_s']:.0f} | {r['peak_mib']:.0f} | {r['peak_mib'] - r['held_mib']:.0f} |")
    return "\n".join(out)


def minilm_table(rows: list[dict], fp32_bytes: int) -> str:
    out = ["| all-MiniLM-L6-v2 | weight MiB | bits/weight | mean cosine to fp32 |", "|---|---:|---:|---:|",
           f"| fp32 | {fp32_bytes / 2**20:.1f} | 32.000 | 1.0000 |"]
    out += [f"| {r['name']} | {r['bytes'] / 2**20:.1f} | {r['bits']:.3f} | {r['cosine']:.4f} |" for r in rows]
    return "\n".join(out)


def checks(rows: list[dict], block: float | None = None) -> list[tuple[str, bool]]:
    by = {r["name"]: r for r in rows}
    out = []
    if block is not None:  # the bound: compile holds at most the model (lent, never
        # copied), its result and two blocks' worth more
        for r in rows:
            if r["name"] != "fp32":
                extra = r["peak_mib"] - r["held_mib"]
                out.append((f"{r['name']}: compile peak {extra:.0f} MiB over the loaded model and the result "
                            f"<= 2 blocks ({2 * block:.0f} MiB)", extra <= 2 * block))
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
    for n, r in by.items():  # the target for int2 with error-compensating adapters (no training)
        if n.startswith("int2") and "init=error" in n:
            how = "after training" if r.get("trained") else "no training"
            out.append((f"{n} ppl {r['ppl']:.3f} within x2 of fp32 ({r['ppl'] / fp32:.2f}, {how})",
                        r["ppl"] <= 2 * fp32))
    uniform = [r for n, r in by.items()
               if n not in ("fp32", SOURCE_FORMAT) and not n.startswith("budget") and "init=error" not in n]
    for n, r in by.items():
        if n.startswith("budget"):
            limit = float(n.split("<=", 1)[1].split()[0])  # "budget avg_bits<=4.5 [by fisher | float zeros]"
            fit = [u for u in uniform if u["bits"] <= limit + 1e-9]
            best = min(fit, key=lambda u: u["ppl"], default=None)
            if best is not None:
                out.append((f"{n} ppl {r['ppl']:.3f} <= best uniform format of <= {limit:g} bits/weight "
                            f"({best['name']}, {best['ppl']:.3f})", r["ppl"] <= best["ppl"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--rows", default=",".join([*ROWS, *TRAINED, *ALL_WINDOWS]), help="comma-separated row names")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--peer", nargs="?", const="int4 g64 GPTQ", default=None,
                    help=f"comma-separated schemes of {', '.join(PEER_SCHEMES)} (default: int4 g64 GPTQ)")
    args = ap.parse_args(argv)
    known = {*ROWS, *TRAINED, *ALL_WINDOWS}
    unknown = [n for n in args.rows.split(",") if n and n not in known]
    unknown_peers = [n for n in (args.peer or "").split(",") if n and n not in PEER_SCHEMES]
    if unknown or unknown_peers:  # a KeyError once the model had loaded, or after every row had run
        ap.error(f"unknown {'--rows' if unknown else '--peer'} {unknown or unknown_peers}; known: "
                 + ", ".join(sorted(known) if unknown else PEER_SCHEMES))
    if argv is None and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":  # freed tensors must leave the RSS
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]],
                  dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072"))
    torch.manual_seed(0)
    start = time.perf_counter()
    names = [n for n in args.rows.split(",") if n]
    rows = smollm_rows(names, args.max_tokens) if names else []
    peers = peer_rows(args.peer.split(","), args.max_tokens, rows) if args.peer else []
    print(f"\nSmolLM2-135M-Instruct, perplexity on the first {args.max_tokens} tokens of default_text(); "
          "calibration 24 x 128 other tokens (rows '+ all calibration windows': every whole 128-token window "
          "after the scored tokens)\n")
    sizes = block_mib(load("smollm2-135m")) if rows else None
    if rows:
        print(table(rows, sizes))
        for r in rows:
            if r["trained"]:
                print(f"  {r['name']}: {r['trained']}")
    if peers:
        versions = ", ".join(f"{k} {v}" for k, v in peers[0]["versions"].items())
        print(f"\nThe same schemes by llm-compressor's GPTQModifier (actorder=static when act_order=true; "
              f"{versions}), same model, calibration and perplexity tokens:\n")
        print(peer_table(peers))
    if not args.no_minilm:
        fp32 = param_bytes(load("minilm-l6").model)
        print()
        print(minilm_table(minilm_rows(), fp32))
    results = checks(rows, sizes[1] if sizes else None)
    print("\nchecks:")
    for what, ok in results:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} threads")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
