"""What compile() did, rule by rule: the `.report` of a CompiledModel, saved with its artifact.

Plain data (JSON round-trip) so that a saved model's report reads the same after load(); printed
as a rich table for people.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = ["RuleReport", "Report", "format_bytes", "counted"]


# What each field of a saved report holds, by its annotation: an edited meta.json (`seconds: {}`)
# loaded, and printing the report then raised a TypeError from its formatting.
_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "str | None": (str, type(None)),
                "dict[str, Any]": (dict,), "tuple[str, ...]": (list,), "tuple[RuleReport, ...]": (list,),
                "tuple['Report', ...]": (list,)}


def _check_fields(cls, d: Any) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"a saved {cls.__name__} is a JSON object, not {d!r}")
    for f in fields(cls):
        if f.name not in d:
            continue
        value, kinds = d[f.name], _FIELD_TYPES[f.type]
        wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if not wrong and f.type == "tuple[str, ...]":
            wrong = not all(isinstance(v, str) for v in value)
        if wrong:
            raise ValueError(f"the report's {cls.__name__}.{f.name} is {value!r}, where a save writes {f.type}")


@dataclass(frozen=True)
class RuleReport:
    """One rule's outcome. `details` holds pass-specific figures (bits/weight, cosine, …)."""

    line: int
    text: str  # the rule in canonical form
    kind: str
    targets: tuple[str, ...] = ()
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"], out["notes"] = list(self.targets), list(self.notes)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RuleReport":
        _check_fields(cls, d)
        return cls(**{**d, "targets": tuple(d.get("targets", ())), "notes": tuple(d.get("notes", ()))})


@dataclass(frozen=True)
class Report:
    """All rules of one compile, plus whole-model figures."""

    policy: str | None  # policy name, None for the empty spec
    model_class: str
    rules: tuple[RuleReport, ...] = ()
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    # What the rules calibrated on ("3,072 tokens in 24 rows"); "" when none needed calibration.
    calibration: str = ""
    # The compiles of a CompiledModel this one started from, oldest first (compile(cm, …) again):
    # what was done to the model before this policy, kept in its artifact.
    earlier: tuple["Report", ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rules"] = [r.to_dict() for r in self.rules]
        out["earlier"] = [r.to_dict() for r in self.earlier]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        _check_fields(cls, d)
        return cls(**{**d, "rules": tuple(RuleReport.from_dict(r) for r in d.get("rules", ())),
                      "earlier": tuple(Report.from_dict(r) for r in d.get("earlier", ()))})

    def after(self, earlier: "Report") -> "Report":
        """This report as the compile of `earlier`'s compiled model: its history, then it."""
        return replace(self, earlier=earlier.earlier + (replace(earlier, earlier=()),))

    def _caption(self) -> str | None:
        lines = [f"compiled before with policy {r.policy or '(empty)'}: "
                 + ("; ".join(x.text for x in r.rules) or "no rules") for r in self.earlier]
        if self.calibration:
            lines.append(f"calibrated on {self.calibration}")
        return "\n".join(lines) or None

    def table(self):
        """A rich Table: one row per rule, then the whole model."""
        from rich.markup import escape
        from rich.table import Table

        # rich reads `[…]` as markup: a path `ad/[exp]` in a rule showed as `ad/`, `[/x]` raised
        caption = self._caption()
        table = Table(title=escape(f"slimfx compile: policy {self.policy or '(empty)'} on {self.model_class}"),
                      caption=escape(caption) if caption else None)
        for col in ("line", "rule", "targets", "params before → after", "bytes before → after", "notes"):
            table.add_column(col, overflow="fold")
        for r in self.rules:
            line = str(r.line) if r.line else ""  # line 0: no policy's (merge_adapters())
            table.add_row(line, escape(r.text), str(len(r.targets)), _arrow(r.params_before, r.params_after),
                          _arrow(r.bytes_before, r.bytes_after, format_bytes), escape("; ".join(r.notes)))
        table.add_row("", "[b]whole model[/b]", "", _arrow(self.params_before, self.params_after),
                      _arrow(self.bytes_before, self.bytes_after, format_bytes), f"{self.seconds:.1f} s")
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=_Null(), color_system=None)
        console.print(self.table())
        return console.export_text()


def _arrow(before: int, after: int, fmt=lambda n: f"{n:,}") -> str:
    return fmt(before) if before == after else f"{fmt(before)} → {fmt(after)}"


def counted(n: int, noun: str) -> str:
    """`1 row`, `3,072 tokens`, `6 batches`: a count and its noun, plural when it is not 1."""
    return f"{n:,} {noun}" + ("" if n == 1 else "es" if noun.endswith("ch") else "s")


def format_bytes(n: int | float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class _Null:
    def write(self, _):
        return 0

    def flush(self):
        pass
