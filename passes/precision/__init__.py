"""The precision pass: weight-only int8 / int4 / int2 (RTN or GPTQ) and fp16 / bf16.

    quantize  blocks.*.** : Linear int4 group=64 method=gptq           -> quantize.run
    precision blocks.*.** : Linear choose {int8, int4 group=32}
              budget avg_bits<=6 by output_mse                         -> choose.run

Reading order: targets.py (a rule's targets, calibration Hessians, applying encodings),
encode.py (one weight in one format), gptq.py (GPTQ and H = E[x xᵀ]), budget.py (the exact
knapsack), rewrite.py (swapping a linear for `slimfx::quant_linear` or a half-precision cast).
"""
from . import choose, quantize

__all__ = ["quantize", "choose"]
