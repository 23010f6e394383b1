"""SpecError: the one exception a user sees for a bad policy, wherever in the pipeline it is found.

Every error points into the policy text (line, column, the source line, a caret) and says what
to do. Several problems found in one pass travel together in `.diagnostics`.
"""
from __future__ import annotations

import collections
import difflib
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Diagnostic", "SpecError", "did_you_mean", "source_lines", "ERROR_KINDS"]

# Every `kind` a Diagnostic may carry, with what it means (README lists these).
ERROR_KINDS: dict[str, str] = {
    "syntax": "the text does not follow the grammar (a missing `}`, a stray character, …)",
    "unknown-keyword": "a misspelt rule keyword, adapter, action or bit format",
    "unknown-parameter": "a parameter the rule does not take",
    "missing-value": "a parameter without `=value` (`rank`), a rule without its required part (`quantize head`), "
                     "or data a rule needs (calibration for GPTQ)",
    "wrong-type": "a value of the wrong type (`rank=1.5`, `merge=yes`)",
    "out-of-range": "a value outside its range (`rank=0`, `keep=1.5`, `group=48`)",
    "invalid-combination": "parameters that cannot go together (`group` on fp16, `ratio` and `count`)",
    "duplicate": "a parameter, policy or rule written twice",
    "illegal-order": "rules in an order that cannot work (`adapt … merge=true` after `quantize`)",
    "encoding": "the file is not UTF-8 text",
    "no-file": "a policy file that does not exist or cannot be read",
    "unknown-policy": "a policy name the file does not hold (or a file of several policies and no name)",
    "too-deep": "selector alternatives nested too deeply to be meant",
    "selector": "a selector that matches nothing in the model",
    "unsupported": "a rule the model or this version cannot apply",
    "internal": "a bug in slimfx: please report it with the policy text",
}


def source_lines(source: str) -> list[str]:
    """Lines as Lark numbers them: split at `\n` only (str.splitlines also splits at form feeds
    and other separators, which would shift every line number after them)."""
    return [line.removesuffix("\r") for line in source.split("\n")]


@dataclass(frozen=True)
class Diagnostic:
    """One problem at one place. line/column are 1-based; 0 means "no position"."""

    kind: str
    message: str
    line: int = 0
    column: int = 0
    width: int = 1
    hint: str | None = None

    def render(self, source: str, filename: str = "<policy>") -> str:
        where = f"{filename}:{self.line}:{self.column}" if self.line else filename
        out = [f"{where}: error[{self.kind}]: {self.message}"]
        lines = source_lines(source)
        if source and 0 < self.line <= len(lines):  # no text (a Spec built in code): no empty line and caret
            text, column = _window(_visible(lines[self.line - 1].expandtabs(1)), self.column)
            out.append(f"    {text}")
            # in terminal cells: a wide character ("漢") takes two, and the caret sat left of its place
            under = text[column - 1:column - 1 + max(1, min(self.width, len(text) - column + 1))]
            out.append("    " + " " * _cells(text[:column - 1]) + "^" * max(1, _cells(under)))
        if self.hint:
            out.append(f"  = {self.hint}")
        return "\n".join(out)


def _visible(text: str) -> str:
    """Control characters as their one-cell pictures (ESC as ␛, a stray CR as ␍): echoed raw, an
    escape sequence in a policy file restyled the terminal and a CR moved the caret's line."""
    return "".join(chr(0x2400 + ord(c)) if ord(c) < 0x20 else "\u2421" if c == "\x7f" else
                   "\ufffd" if unicodedata.category(c) == "Cc" else c for c in text)


def _cells(text: str) -> int:
    """Terminal cells `text` takes: two for East Asian wide and full-width characters."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _window(text: str, column: int, width: int = 100) -> tuple[str, int]:
    """A long source line cut to `width` characters around the column (with `…` marks)."""
    if len(text) <= width:
        return text, column
    start = max(0, min(column - 1 - width // 2, len(text) - width))
    cut = ("…" if start else "") + text[start:start + width] + ("…" if start + width < len(text) else "")
    return cut, column - start + (1 if start else 0)


# Diagnostics str(SpecError) renders (each takes four lines); the rest are counted by kind.
MAX_RENDERED = 50


class SpecError(ValueError):
    """A policy that cannot be applied. `.line`, `.column`, `.source_line`, `.kind` describe the
    first problem; `.diagnostics` holds all of them; `str()` renders each with a caret (the first
    MAX_RENDERED, then a count of the rest by kind)."""

    def __init__(self, diagnostics: Diagnostic | Sequence[Diagnostic], source: str = "",
                 filename: str = "<policy>"):
        diags = [diagnostics] if isinstance(diagnostics, Diagnostic) else list(diagnostics)
        if not diags:
            raise ValueError("SpecError needs at least one diagnostic")
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diags)
        self.source = source
        self.filename = filename
        super().__init__(self.render())

    @classmethod
    def at(cls, kind: str, message: str, *, line: int = 0, column: int = 0, width: int = 1,
           hint: str | None = None, source: str = "", filename: str = "<policy>") -> "SpecError":
        return cls(Diagnostic(kind, message, line, column, width, hint), source, filename)

    first = property(lambda self: self.diagnostics[0])
    kind = property(lambda self: self.first.kind)
    line = property(lambda self: self.first.line)
    column = property(lambda self: self.first.column)
    hint = property(lambda self: self.first.hint)
    message = property(lambda self: self.first.message)

    @property
    def source_line(self) -> str:
        lines = source_lines(self.source)
        return lines[self.line - 1] if 0 < self.line <= len(lines) else ""

    def render(self) -> str:
        shown = [d.render(self.source, self.filename) for d in self.diagnostics[:MAX_RENDERED]]
        rest = self.diagnostics[MAX_RENDERED:]
        if rest:
            # 20,000 copies of one rule printed 80,000 lines; the first few say what to fix
            kinds = collections.Counter(d.kind for d in rest)
            shown.append(f"{self.filename}: … and {len(rest):,} more not shown "
                         f"({', '.join(f'{n:,} {kind}' for kind, n in kinds.most_common())}): fix the problems "
                         "above and run it again to see the rest")
        return "\n".join(shown)


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str | None:
    """`did you mean `rank`?` for a close candidate, else None. Case counts for nothing in the
    distance (`INT8`, `LoRA` had no suggestion), and one differing only in case is the only one
    (`INT8` got "`int8` or `int4` or `int2`")."""
    by_lower: dict[str, str] = {}
    for c in candidates:
        by_lower.setdefault(c.lower(), c)
    if word.lower() in by_lower:
        return f"did you mean `{by_lower[word.lower()]}`?"
    close = [by_lower[c] for c in difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=0.6)]
    if not close:
        return None
    return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"
