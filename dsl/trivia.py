"""Attach comments and blank lines to the AST, so that `slimfx fmt` rewrites a file without
losing a word of it. Comments never change what a policy means (Trivia is compare=False).

A comment alone on its line belongs to the node below it; a comment after code belongs to the
node on its line.
"""
from __future__ import annotations

import dataclasses

from lark import Token

from . import ast as A
from .errors import source_lines

__all__ = ["attach_trivia"]


def attach_trivia(spec: A.Spec, comments: list[Token]) -> A.Spec:
    lines = source_lines(spec.source)
    own = {c.line: str(c).rstrip() for c in comments if not lines[c.line - 1][: c.column - 1].strip()}
    inline = {c.line: str(c).rstrip() for c in comments if c.line not in own}
    cursor = _Cursor(own, inline, lines)
    policies = tuple(_attach_policy(p, cursor) for p in spec.policies)
    trailing = cursor.trivia_before(len(lines) + 1, at_line=None)
    return dataclasses.replace(spec, policies=policies, trailing=trailing)


def _attach_policy(policy: A.Policy, cursor: "_Cursor") -> A.Policy:
    # `policy a { quantize head int8  # why`: the comment follows the rule, so the rule keeps it
    first_rule_here = bool(policy.rules) and policy.rules[0].span.line == policy.span.line
    trivia = cursor.trivia_before(policy.span.line, at_line=policy.span.line, inline=not first_rule_here)
    rules = tuple(dataclasses.replace(r, trivia=cursor.trivia_before(r.span.line, at_line=r.span.line))
                  for r in policy.rules)
    closing_line = policy.span.end_line
    closing = cursor.trivia_before(closing_line, at_line=closing_line if closing_line != policy.span.line else None)
    return dataclasses.replace(policy, rules=rules, trivia=trivia, closing=closing)


class _Cursor:
    """Walks the file top to bottom, handing out the comments above and on each node's line."""

    def __init__(self, own: dict[int, str], inline: dict[int, str], lines: list[str]):
        self.own, self.inline, self.lines = own, inline, lines
        self.line = 0  # last line already handed out

    def trivia_before(self, line: int, *, at_line: int | None, inline: bool = True) -> A.Trivia:
        """The comments above `line`, with "" where blank lines stood between them and below the
        last (a file's header comment kept apart from the first policy), and whether a blank
        line stands above the first (not at the top of the file)."""
        leading: list[str] = []
        first_gap, gap = None, False  # first_gap: a blank line above the first comment or the node
        for n in range(self.line + 1, min(line, len(self.lines) + 1)):
            if n in self.own:
                if first_gap is None:
                    first_gap = gap
                elif gap:
                    leading.append("")
                leading.append(self.own[n])
                gap = False
            elif not self.lines[n - 1].strip():
                gap = True
        if first_gap is None:
            first_gap = gap
        elif gap and at_line is not None:  # at the end of the file a blank means nothing
            leading.append("")
        blank = first_gap and self.line > 0
        leading = tuple(leading)
        comment = self.inline.pop(at_line, None) if at_line is not None and inline else None
        self.line = max(self.line, line if at_line is not None else line - 1)
        return A.Trivia(leading, comment, blank)
