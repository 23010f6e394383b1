"""Golden files: the emitted source of a few fixed groups, so a change to a template shows up as a
diff to review. Regenerate them after an intended change with

    SLIMFX_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/codegen/test_golden.py

(the test then writes the files and fails, so a regeneration is never mistaken for a pass)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slimfx.codegen.emit import emit_all
from slimfx.codegen.partition import partition

from graphs import QuantLinear, SharedInput, capture, capture_module

GOLDEN = Path(__file__).parent / "golden"


def _rmsnorm_like(dtype=torch.float32):
    # x * rsqrt(mean(x·x) + c) as a chain: mul, mean, add, rsqrt, mul — one row group.
    gm, _ = capture([("mul", (0, 0)), ("mean", (1,)), ("sigmoid", (2,)), ("mul", (0, 3)), ("softmax", (4,))],
                    dtype=dtype)
    return gm


CASES = {
    "rows_chain": _rmsnorm_like,
    "rows_chain_bf16": lambda: _rmsnorm_like(torch.bfloat16),  # widened loads, each op rounded, narrowed stores
    "gemm_int4_g32_asym_silu_fp16": lambda: capture_module(QuantLinear(40, 24, 4, 32, False, True, "silu"),
                                                           torch.randn(2, 40).half()),
    "gemm_int4_g32_asym_silu": lambda: capture_module(QuantLinear(40, 24, 4, 32, False, True, "silu"),
                                                      torch.randn(2, 40)),
    "gemm_int4_g32_float_zero_silu": lambda: capture_module(
        QuantLinear(40, 24, 4, 32, False, True, "silu", zero="float"), torch.randn(2, 40)),
    "gemm_int2_g16_residual": lambda: capture_module(QuantLinear(24, 24, 2, 16, True, False, "relu_residual"),
                                                     torch.randn(2, 24)),
    "gemm_int8_per_channel": lambda: capture_module(QuantLinear(24, 8, 8, None, True, False, "none"),
                                                    torch.randn(2, 24)),
    "gemm_merged_swiglu": lambda: capture_module(SharedInput(24, (16, 16), swiglu=True), torch.randn(2, 24)),
    "gemm_merged_qkv_widths": lambda: capture_module(SharedInput(24, (16, 8, 8)), torch.randn(2, 24)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_emitted_source_matches_its_golden_file(case):
    done = emit_all(partition(CASES[case]()))
    assert done.kernels and not done.eager
    text = "\n# ---- next kernel ----\n".join(k.source for k in done.kernels)
    path = GOLDEN / f"{case}.py.txt"
    if os.environ.get("SLIMFX_REGEN_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        pytest.fail(f"regenerated {path}; review the diff, then run again without SLIMFX_REGEN_GOLDEN")
    assert path.exists(), f"no golden file {path}: run with SLIMFX_REGEN_GOLDEN=1 once"
    assert text == path.read_text(), f"{case}: the emitted source changed; see the module doc to regenerate"
