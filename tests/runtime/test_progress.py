"""Progress bars: drawn on a terminal when asked, plain lines elsewhere, silent unless asked; the
passes report what they do."""
import io
import re

import torch
from rich.console import Console

import slimfx
from slimfx.models import tiny
from slimfx.passes.bind import bind
from slimfx.passes.capture import capture
from slimfx.passes.context import Context
from slimfx.passes.pipeline import run_pipeline
from slimfx.dsl.parser import parse
from slimfx.runtime.progress import Progress


def terminal() -> tuple[Progress, io.StringIO]:
    buf = io.StringIO()
    return Progress(Console(file=buf, force_terminal=True, width=150)), buf


def test_a_task_draws_its_description_count_and_note_on_a_terminal():
    progress, buf = terminal()
    with progress.task("GPTQ int4", total=3) as step:
        for name in ("a.q", "a.k", "a.v"):
            step(note=name)
    out = buf.getvalue()
    assert "GPTQ int4" in out and "3/3" in out and "done" in out


def test_silent_unless_enabled(capsys):
    assert not Progress().enabled and not Progress.for_terminal(False).enabled
    m = tiny("llama")
    slimfx.compile(m.model, "policy p {\n    quantize blocks.*.** : Linear int4 method=gptq\n}\n",
                   example_inputs=m.example_inputs, calib=torch.randint(3, 100, (2, 8)))
    assert capsys.readouterr().err == ""


def test_enabled_off_a_terminal_it_prints_a_line_as_each_task_starts_and_ends(capsys):
    """Under CI or `| tee` a compile printed nothing for 18 minutes, and looked hung."""
    progress = Progress.for_terminal(True)  # pytest's stderr is not a terminal
    assert progress.enabled and progress.console is None
    m = tiny("llama")
    slimfx.compile(m.model, "policy p {\n    quantize blocks.*.** : Linear int4 method=gptq\n}\n",
                   example_inputs=m.example_inputs, calib=torch.randint(3, 100, (2, 8)), progress=True)
    lines = capsys.readouterr().err.splitlines()
    start = lines.index("GPTQ int4 group=64, block by block (line 2) …")
    assert re.fullmatch(r"GPTQ int4 group=64, block by block \(line 2\): 14/14 done in [0-9.]+ s", lines[start + 1])


def test_gptq_and_the_budget_solver_show_what_they_are_doing():
    m = tiny("llama")
    graph = capture(m.model, m.example_inputs)
    policy = parse("policy p {\n    quantize blocks.*.attn.* int4 method=gptq\n"
                   "    precision blocks.*.mlp.* choose {int8, int4} budget avg_bits<=6 by output_mse\n}\n").policy()
    progress, buf = terminal()
    calib = [{"input_ids": torch.randint(3, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    run_pipeline(graph, bind(graph, policy), Context(calib=calib, progress=progress))
    out = buf.getvalue()
    for says in ("GPTQ int4 group=64, block by block (line 2)", "model.layers.1.self_attn.q_proj", "scoring 2 formats",
                 "solving the budget (line 3)", "model.layers.1.mlp.down_proj"):
        assert says in out, says


def test_the_last_stage_is_named_for_packed_weights_only_where_there_are_some(capsys):
    """A policy with no quantized linear printed "converting packed weights for the CPU kernels:
    done in 0.0 s" (the demo's MiniLM token policy)."""
    m = tiny("llama")

    def stages(policy):
        slimfx.compile(m.model, policy, example_inputs=m.example_inputs, calib=torch.randint(3, 100, (2, 8)),
                       progress=True)
        return capsys.readouterr().err.splitlines()

    plain = stages("keep head")
    assert "building …" in plain and not any("packed weights" in line for line in plain), plain
    assert "converting packed weights for the CPU kernels …" in stages("quantize blocks.*.mlp.* : Linear int8")
