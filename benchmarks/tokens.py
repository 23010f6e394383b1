"""Token pass on all-MiniLM-L6-v2 sentence embeddings: quality and CPU speed against the original.

Two padded batches of 16 real paragraphs (40+ words each, from the built-in standard-library
text); embeddings by mean pooling with the original attention mask (evaluation.embed). For each
policy: mean and minimum cosine of the embeddings to the original model's, and the CPU speed ratio
of one forward per batch (one thread, medians, original and compiled timed in the same run).

    .venv/bin/python benchmarks/tokens.py [--threads 1] [--repeats 10]

Then SmolLM2-135M prefill of 512 tokens: top-1 agreement of the last-token logits with the
original for `prune keep=0.7` after block 8 (by norm and by attention), and the latency ratio.

Rows "without unpad" have no `tokens unpad`: blocks before the first merge run on the padded batch,
and the merge rule packs the real tokens from its first block on (apply.py).
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import slimfx
from slimfx.evaluation import default_text, embed, latency_ms
from slimfx.models import load

MERGE = "tokens after {blocks} merge ratio={ratio} protect=cls restore=true"
PRUNE = "tokens after blocks[{block}] prune keep={keep} score=norm protect=cls restore=true"
POLICIES = {
    "unpad": "tokens unpad",
    "unpad + int8": "tokens unpad\nquantize blocks.*.** : Linear int8",
    "int8 alone": "quantize blocks.*.** : Linear int8",
    "unpad + merge 0.5 after block 2": "tokens unpad\n" + MERGE.format(blocks="blocks[2]", ratio=0.5),
    "unpad + merge 0.3 after blocks 1-4": "tokens unpad\n" + MERGE.format(blocks="blocks[1:5]", ratio=0.3),
    "unpad + merge 0.3 after blocks 2-4": "tokens unpad\n" + MERGE.format(blocks="blocks[2:5]", ratio=0.3),
    "unpad + merge 0.2 after blocks 1-4": "tokens unpad\n" + MERGE.format(blocks="blocks[1:5]", ratio=0.2),
    "unpad + merge 0.15 after blocks 1-4": "tokens unpad\n" + MERGE.format(blocks="blocks[1:5]", ratio=0.15),
    "unpad + merge 0.3 after blocks 3-4": "tokens unpad\n" + MERGE.format(blocks="blocks[3:5]", ratio=0.3),
    "unpad + merge 0.3 after blocks 3-4 + prop_attn": "tokens unpad\n" + MERGE.format(blocks="blocks[3:5]", ratio=0.3)
    + " prop_attn=true",
    "unpad + merge 0.2 after blocks 1-4 + prop_attn": "tokens unpad\n" + MERGE.format(blocks="blocks[1:5]", ratio=0.2)
    + " prop_attn=true",
    "unpad + merge 0.15 after blocks 1-4 + prop_attn": "tokens unpad\n" + MERGE.format(blocks="blocks[1:5]", ratio=0.15)
    + " prop_attn=true",
    "unpad + prune 0.7 (norm) after block 2": "tokens unpad\n" + PRUNE.format(block=2, keep=0.7),
    "unpad + prune 0.5 (norm) after block 3": "tokens unpad\n" + PRUNE.format(block=3, keep=0.5),
}
POLICIES.update({
    "unpad + merge 0.3 after blocks 3-4 + prop_attn + by keys": "tokens unpad\n"
    + MERGE.format(blocks="blocks[3:5]", ratio=0.3) + " prop_attn=true by=keys",
    "unpad + merge 0.15 after blocks 1-4 + prop_attn + by keys": "tokens unpad\n"
    + MERGE.format(blocks="blocks[1:5]", ratio=0.15) + " prop_attn=true by=keys",
    "unpad + prune 0.7 (attention) after block 2": "tokens unpad\n"
    + PRUNE.format(block=2, keep=0.7).replace("score=norm", "score=attention"),
    "unpad + prune 0.5 (attention) after block 3": "tokens unpad\n"
    + PRUNE.format(block=3, keep=0.5).replace("score=norm", "score=attention"),
    "without unpad: merge 0.15 after blocks 0-4 + prop_attn": MERGE.format(blocks="blocks[0:5]", ratio=0.15)
    + " prop_attn=true",
    "without unpad: merge 0.15 after blocks 1-4 + prop_attn": MERGE.format(blocks="blocks[1:5]", ratio=0.15)
    + " prop_attn=true",
    "without unpad: merge 0.3 after blocks 3-4 + prop_attn": MERGE.format(blocks="blocks[3:5]", ratio=0.3)
    + " prop_attn=true",
    "specs/minilm-fast.slim (unpad; prune 0.5 by attention after 1; merge 0.25 after 3; int8)":
    (Path(__file__).parent.parent / "specs" / "minilm-fast.slim").read_text(),
})
SMOL_PRUNES = ["tokens unpad\n" + PRUNE.format(block=8, keep=0.7),
               "tokens unpad\n" + PRUNE.format(block=8, keep=0.7).replace("score=norm", "score=attention")]


def paragraphs(min_words: int = 40) -> list[list[str]]:
    ps = [p for p in default_text().split("\n\n") if len(p.split()) >= min_words]
    if len(ps) < 17:
        raise SystemExit(f"only {len(ps)} paragraphs of {min_words}+ words in the built-in text")
    return [ps[:16], ps[-16:]]


def cosines(model, ref_embeddings, tokenizer, batches) -> list[float]:
    out = []
    for ref, texts in zip(ref_embeddings, batches):
        got = embed(model, tokenizer, texts)
        out += F.cosine_similarity(ref.double(), got.double(), dim=-1).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated policy names (default: all)")
    ap.add_argument("--skip-smollm2", action="store_true", help="leave out the SmolLM2 prefill row")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load("minilm-l6")
    batches = paragraphs()
    encoded = [dict(lm.tokenizer(b, padding=True, truncation=True, return_tensors="pt")) for b in batches]
    real = sum(int(e["attention_mask"].sum()) for e in encoded)
    grid = sum(e["attention_mask"].numel() for e in encoded)
    ref = [embed(lm.model, lm.tokenizer, b) for b in batches]
    base = [latency_ms(lm.model, e, repeats=args.repeats) for e in encoded]
    print(f"# all-MiniLM-L6-v2, {len(batches)} padded batches of 16 paragraphs: {real} real of {grid} "
          f"tokens ({real / grid:.1%}); {args.threads} thread(s); {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print("| policy | mean cosine | min cosine | CPU speed × | compile s |")
    print("|---|---:|---:|---:|---:|")
    print("| original | 1.0000 | 1.0000 | 1.00 | |")
    chosen = {n: r for n, r in POLICIES.items() if not args.only or n in args.only.split(",")}
    for name, rules in chosen.items():
        start = time.perf_counter()
        cm = slimfx.compile(lm.model, rules, example_inputs=encoded[0], calib=encoded)
        seconds = time.perf_counter() - start
        cos = cosines(cm, ref, lm.tokenizer, batches)
        ms = [latency_ms(cm, e, repeats=args.repeats) for e in encoded]
        speed = statistics.mean(b / m for b, m in zip(base, ms))
        print(f"| {name} | {statistics.mean(cos):.4f} | {min(cos):.4f} | {speed:.2f} | {seconds:.1f} |")
    if not args.skip_smollm2:
        smollm2_prefill(args.repeats)


def smollm2_prefill(repeats: int, tokens: int = 512, stride: int = 256) -> None:
    """Top-1 agreement of the last-token logits with the original over windows of 512 tokens of the
    built-in text (batch 1, no padding), and the latency of one 1×512 prefill."""
    lm = load("smollm2-135m")
    ids = lm.tokenizer(default_text(), return_tensors="pt")["input_ids"][0]
    windows = [ids[i:i + tokens][None] for i in range(0, ids.numel() - tokens + 1, stride)]
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    with torch.no_grad():
        want = [lm.model(**b).logits[0, -1].argmax() for b in batches]
    base = latency_ms(lm.model, batches[0], repeats=repeats)
    print(f"\n# SmolLM2-135M prefill, {len(batches)} windows of {tokens} tokens (stride {stride})")
    print("| policy | top-1 agreement of last-token logits | CPU speed × | compile s |")
    print("|---|---:|---:|---:|")
    for rules in SMOL_PRUNES:
        start = time.perf_counter()
        cm = slimfx.compile(lm.model, rules, example_inputs=batches[0], calib=batches[:2])
        seconds = time.perf_counter() - start
        with torch.no_grad():
            agree = sum(int(w == cm(**b).logits[0, -1].argmax()) for w, b in zip(want, batches))
        ms = latency_ms(cm, batches[0], repeats=repeats)
        print(f"| `{rules.replace(chr(10), '` + `')}` | {agree}/{len(batches)} ({agree / len(batches):.0%}) | "
              f"{base / ms:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
