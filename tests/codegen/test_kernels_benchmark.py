"""benchmarks/kernels.py runs where there is no GPU: it says so and exits 0, and `--interpret`
runs every case (int4 GEMM, RMSNorm, LoRA) at tiny shapes through Triton's interpreter, checking
each generated kernel against eager before it times anything."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def _script():
    spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script times for real")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    assert _script().main([]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out


def test_every_case_runs_through_the_interpreter(capsys):
    assert _script().main(["--interpret"]) == 0
    out = capsys.readouterr().out
    for table in ("| int4 g128 GEMM |", "| fused RMSNorm |", "| LoRA r=4 linear (float32, one fused kernel) |"):
        assert table in out
    assert out.count("\n| 40×24 | ") == 2 and "| RMSNorm | 3×40 |" in out


def test_the_half_precision_path_runs_through_the_interpreter_in_float16(capsys):
    assert _script().main(["--interpret", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "activations torch.float16" in out and "| LoRA r=4 linear (float16, one fused kernel) |" in out
    assert "| 40×24 r=4 | 3 | " in out and " | 1 | " in out  # the LoRA linear is one kernel


def test_bfloat16_under_the_interpreter_is_refused_with_what_to_do(capsys):
    with pytest.raises(SystemExit) as stop:
        _script().main(["--interpret", "--dtype", "bfloat16"])
    assert stop.value.code == 2
    assert "use --dtype float16 or float32" in capsys.readouterr().err
