"""benchmarks/collapse.py run as a script (as its docstring says): it loads SmolLM2 — with
benchmarks/ first on sys.path, where kernels.py once shadowed the `kernels` package transformers
imports — and refuses `--generate` with too few LoRA steps before measuring any row."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "collapse.py"


def test_too_few_steps_for_the_written_text_are_refused_before_any_row():
    done = subprocess.run([sys.executable, str(SCRIPT), "--generate", "24576", "--lora-steps", "40"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--generate 24576 fills batches up to step 54: give --lora-steps 54 or more" in done.stderr
    assert "fp32: perplexity" not in done.stdout  # nothing was measured


def test_the_steps_needed_count_the_calibration_asked_for():
    """--calib-tokens 25000 is 49 calibration batches, so the written text starts at step 50."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--generate", "24576", "--lora-steps", "54",
                           "--calib-tokens", "25000"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "give --lora-steps 97 or more" in done.stderr
