"""The peer row of benchmarks/precision.py: llm-compressor's GPTQ on the same model and tokens.

Runs INSIDE .venv-peer (`bash benchmarks/peer_venv.sh` makes it), as a subprocess of
`benchmarks/precision.py --peer`; imports nothing from slimfx. Reads an fp32 model folder
(save_pretrained() with its tokenizer) and a .pt file of calibration windows (a LongTensor
[n, length] of token ids: the ones slimfx calibrates on), runs llm-compressor's `oneshot` with
`GPTQModifier(targets="Linear", ignore=["lm_head"])` on CPU (the decoder layers' linears; the
embedding and the tied head stay fp32), and writes

    OUT/weights.pt   {"<module>.weight": dequantized fp32 weight} of every quantized linear
    OUT/result.json  {"seconds": oneshot's wall time, "linears": n, "versions": {...}, ...}

After GPTQ, llm-compressor leaves `module.weight` holding the quantized-dequantized values
(GPTQ's Q, written by update_batch_qparams) beside `weight_scale` / `weight_zero_point`; the
forward fake-quantizes it again, which is idempotent. This script re-derives the weight from
the codes either way (round(w / scale) + zero, clamped, dequantized) and checks that it equals
`module.weight` and that every group of every row holds at most 2**bits distinct values.

    .venv-peer/bin/python benchmarks/peer_gptq.py MODEL_DIR CALIB.pt OUT \
        [--bits 4] [--group 64] [--asym] [--no-act-order] [--damp 0.01]

MODEL_DIR may also be a .gguf file (SmolLM2's fixture wheel), read through transformers'
GGUF loader.
"""
from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where kernels.py would shadow the `kernels` package
# transformers imports when it is installed ("cannot import name 'CUDAProperties'"): off it goes.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse
import json
import time
from pathlib import Path

import torch


def load_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        path = path.parent
    else:
        kw = {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    return model.eval(), tokenizer


def recipe(bits: int, group: int, sym: bool, act_order: bool, damp: float):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group",
                               group_size=group, observer="minmax")
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    # actorder "static": columns in descending Hessian-diagonal order, the groups' scales fixed
    # up front from the original weight's contiguous groups: slimfx's act_order=true.
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                        actorder="static" if act_order else None, dampening_frac=damp)


def dequantized(module, bits: int, group: int) -> torch.Tensor:
    """The linear's weight rebuilt from its codes, checked against module.weight."""
    w = module.weight.detach().float()
    scale = module.weight_scale.detach().float()                  # [out, in / group]
    zero = getattr(module, "weight_zero_point", None)
    zero = torch.zeros_like(scale) if zero is None else zero.detach().float()
    cols = w.shape[1]
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    s = scale.repeat_interleave(group, dim=1)[:, :cols]
    z = zero.repeat_interleave(group, dim=1)[:, :cols]
    q = torch.clamp(torch.round(w / s) + z, lo, hi)
    deq = (q - z) * s
    err = (deq - w).abs().max().item()
    if err > 1e-5 * max(w.abs().max().item(), 1e-12):
        raise AssertionError(f"module.weight is not the dequantized codes (max diff {err:.3g})")
    return deq


def max_distinct(w: torch.Tensor, group: int) -> int:
    """The most distinct values any row's group of `group` contiguous columns holds."""
    rows = w.reshape(-1, group)
    srt = rows.sort(dim=1).values
    return int(((srt[:, 1:] != srt[:, :-1]).sum(1) + 1).max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01)
    args = ap.parse_args(argv)

    import importlib.metadata as md

    from datasets import Dataset
    from llmcompressor import oneshot

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    windows = torch.load(args.calib).long()
    n, length = windows.shape
    data = Dataset.from_dict({"input_ids": windows.tolist(),
                              "attention_mask": torch.ones_like(windows).tolist()})
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data,
            recipe=recipe(args.bits, args.group, not args.asym, not args.no_act_order, args.damp),
            num_calibration_samples=n, max_seq_length=length, shuffle_calibration_samples=False,
            batch_size=1, pipeline="sequential")
    seconds = time.perf_counter() - start

    weights, worst = {}, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale"):
            w = dequantized(module, args.bits, args.group)
            worst = max(worst, max_distinct(w, args.group))
            weights[f"{name}.weight"] = w.contiguous()
    if not weights:
        raise SystemExit("peer_gptq: llm-compressor quantized no linear")
    if worst > 1 << args.bits:
        raise SystemExit(f"peer_gptq: a group holds {worst} distinct values")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(weights, args.out / "weights.pt")
    result = {"seconds": seconds, "linears": len(weights), "max_distinct_per_group": worst,
              "calibration": [n, length], "bits": args.bits, "group": args.group,
              "sym": not args.asym, "act_order": not args.no_act_order, "damp": args.damp,
              "versions": {p: md.version(p) for p in
                           ("llmcompressor", "compressed-tensors", "transformers", "torch")}}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"peer_gptq: {len(weights)} linears, {seconds:.0f} s, <= {worst} values per group",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
