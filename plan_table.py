"""A Plan as a rich table for `slimfx plan`: what each rule would touch and cost, before any weight
is touched. UI, so it lives with the CLI, not in passes/."""
from __future__ import annotations

import dataclasses

from rich.markup import escape
from rich.table import Table

from .passes.bind import Plan
from .passes.pipeline import is_implemented
from .runtime.report import format_bytes

__all__ = ["plan_table", "plan_text", "ShownPlan"]


def plan_table(plan: Plan, filename: str = "") -> Table:
    name = plan.policy.name if plan.policy else "(empty)"
    where = f" ({filename})" if filename else ""
    # rich reads `[…]` as markup: a path `ad/[exp]` showed as `ad/`, and `[/x]` raised a MarkupError
    table = Table(title=escape(f"slimfx plan: policy {name}{where} on {plan.model_class}"
                               f" — {plan.params_total:,} params, {format_bytes(plan.bytes_total)}"))
    for col in ("line", "rule", "targets", "examples", "params before → after", "bytes before → after",
                "status / warnings"):
        table.add_column(col, overflow="fold")
    for b in plan.rules:
        e = b.estimate
        names = b.names
        examples = ", ".join(names[:3]) + (f", … (+{len(names) - 3})" if len(names) > 3 else "")
        status = "ready" if is_implemented(b.rule) else "[yellow]not implemented yet[/yellow]"
        notes = "; ".join(x for x in (e.note, *b.warnings) if x)
        table.add_row(str(b.line), escape(b.text), str(len(names)), escape(examples),
                      _arrow(e.params_before, e.params_after, lambda n: f"{n:,}"),
                      _arrow(e.bytes_before, e.bytes_after, format_bytes), status + (f"; {escape(notes)}" if notes else ""))
    return table


def plan_text(plan: Plan, filename: str = "", width: int = 160) -> str:
    """The table as plain text (for logs, tests and `repr`)."""
    from io import StringIO

    from rich.console import Console

    console = Console(width=width, file=StringIO(), color_system=None, record=True)
    console.print(plan_table(plan, filename))
    return console.export_text()


class ShownPlan(Plan):
    """The Plan slimfx.plan() returns: print() gives the table `slimfx plan` prints (the dataclass
    repr of every bound rule ran to tens of kilobytes)."""

    def __str__(self) -> str:
        return plan_text(self)

    def __repr__(self) -> str:
        name = self.policy.name if self.policy else "(empty)"
        return (f"<Plan: policy {name} on {self.model_class}, {len(self.rules)} rule"
                f"{'s' * (len(self.rules) != 1)}; print() it for the table>")

    @classmethod
    def of(cls, plan: Plan) -> "ShownPlan":
        return cls(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)})


def _arrow(before, after, fmt) -> str:
    return fmt(before) if before == after else f"{fmt(before)} → ≈{fmt(after)}"

