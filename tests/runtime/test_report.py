"""runtime/report.py: the compile report's table, one cell per column for every rule and the
whole model (a comment once swallowed two cells of every rule row: bytes showed under targets)."""
from __future__ import annotations

from slimfx.runtime.report import Report, RuleReport


def _columns(report: Report) -> dict[str, list[str]]:
    return {c.header: [str(x) for x in c._cells] for c in report.table().columns}


def test_each_rule_fills_every_column_of_its_row():
    rule = RuleReport(3, "quantize blocks.*.** int8", "quantize", ("a", "b"), 1000, 500, 4096, 1024, notes=("ok",))
    merge = RuleReport(0, "merge_adapters()", "merge", ("a",), 8, 0, 32, 0)
    cols = _columns(Report("p", "M", (rule, merge), 1000, 500, 4096, 1024, 1.5))
    assert cols["line"] == ["3", "", ""]
    assert cols["targets"] == ["2", "1", ""]
    assert cols["params before → after"] == ["1,000 → 500", "8 → 0", "1,000 → 500"]
    assert cols["bytes before → after"] == ["4.0 KiB → 1.0 KiB", "32 B → 0 B", "4.0 KiB → 1.0 KiB"]
    assert cols["notes"] == ["ok", "", "1.5 s"]
