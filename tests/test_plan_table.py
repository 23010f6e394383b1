"""Tables (plan, the compile report, eval) show the user's text as it is: rich read `[…]` in it as
markup, so an adapter folder `ad/[exp]` showed as `ad/`, and one under `[/x]` raised a MarkupError
after the artifact was saved."""
from __future__ import annotations

import dataclasses
import io

from rich.console import Console

import slimfx
from slimfx.eval_table import eval_table
from slimfx.models import tiny
from slimfx.plan_table import plan_text


def _text(table) -> str:
    console = Console(width=600, record=True, color_system=None, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_brackets_in_paths_and_names_are_shown_as_written(tmp_path):
    lm = tiny("llama")
    for folder in ("ad/[exp]", "ad2/[/x]"):
        slimfx.compile(lm, "adapt blocks.*.attn.{q,v} lora").save_adapters(tmp_path / folder)
        rule = f'adapt blocks.*.attn.{{q,v}} lora from="{tmp_path / folder}"'
        planned = plan_text(slimfx.plan(lm, rule), "p[v2].slim", width=600)
        assert f'from="{tmp_path / folder}"' in planned and "(p[v2].slim)" in planned
        assert f'from="{tmp_path / folder}"' in _text(slimfx.compile(lm, rule).report.table())
    named = dataclasses.replace(lm, name="runs/[v2]")
    assert "slimfx eval: runs/[v2]" in _text(eval_table(named, max_tokens=16))
