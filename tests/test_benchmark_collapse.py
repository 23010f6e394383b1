"""benchmarks/collapse.py run as a script (as its docstring says): it loads SmolLM2 — with
benchmarks/ first on sys.path, where kernels.py once shadowed the `kernels` package transformers
imports — and refuses `--generate` with too few LoRA steps before measuring any row; the heal rule it writes."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from slimfx.dsl import parse

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


def test_the_lora_heal_it_writes_carries_reach_and_schedule_and_parses():
    spec = importlib.util.spec_from_file_location("collapse_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # main() runs only as a script
    # reach=1 and a constant lr are the rule's defaults: the default row's rule stays as before
    assert "reach" not in bench.lora(40) and "schedule" not in bench.lora(40)
    rules = f"policy p {{\ndrop blocks[2]\n{bench.LINEAR}\n{bench.lora(600, 0, 3, 'cosine')}\n}}"
    heal = parse(rules).policies[0].rules[2]
    params = dict((p.name, p.value) for p in heal.params)
    assert params["reach"] == 3 and params["schedule"] == "cosine"


def test_an_eval_or_calibration_text_that_cannot_be_read_is_refused_before_the_model_loads(tmp_path):
    missing = tmp_path / "news.txt"
    done = subprocess.run([sys.executable, str(SCRIPT), "--eval-text", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot read eval text {str(missing)!r}" in done.stderr
    (tmp_path / "empty.txt").write_text("\n\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--calib-text", str(tmp_path / "empty.txt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is empty" in done.stderr, done.stderr[-2000:]
    assert "fp32: perplexity" not in done.stdout


def test_calibration_tokens_and_a_calibration_text_are_exclusive(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--calib-tokens", "25000", "--calib-text", "x.txt"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not allowed with argument" in done.stderr, done.stderr[-2000:]
