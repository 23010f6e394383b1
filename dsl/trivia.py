"""Attach comments and blank lines to the AST, so that `slimfx fmt` rewrites a file without
losing a word of it. Comments never change what a policy means (Trivia is compare=False).

A comment alone on its line belongs to the node below it; a comment after code belongs to the
node on its line, the last one where several share it (`} policy b { keep y }  # about b` is b's).
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
    last: dict[int, tuple[int, int]] = {}  # line -> (policy, ask) of the last node on it asking for its comment
    for i, policy in enumerate(spec.policies):
        for k, line in enumerate(_asking_lines(policy)):
            if line is not None:
                last[line] = (i, k)
    cursor = _Cursor(own, inline, lines, last)
    policies = tuple(_attach_policy(p, i, cursor) for i, p in enumerate(spec.policies))
    trailing = cursor.trivia_before(len(lines) + 1, at_line=None)
    return dataclasses.replace(spec, policies=policies, trailing=trailing)


def _asking_lines(policy: A.Policy) -> list[int | None]:
    """The line whose inline comment each node of `policy` may take, in file order: its header,
    each rule, its closing brace; None for a node that takes none."""
    # `policy a { quantize head int8  # why`: the comment follows the rule, so the rule keeps it
    first_rule_here = bool(policy.rules) and policy.rules[0].span.line == policy.span.line
    closing_line = policy.span.end_line
    # `keep x }  # c` (and bare rules, whose made-up brace is on the last rule's line): the rule's
    last_rule_here = bool(policy.rules) and policy.rules[-1].span.end_line == closing_line
    return [None if first_rule_here else policy.span.line, *(r.span.line for r in policy.rules),
            None if closing_line == policy.span.line or last_rule_here else closing_line]


def _attach_policy(policy: A.Policy, index: int, cursor: "_Cursor") -> A.Policy:
    header, *at_rules, at_closing = _asking_lines(policy)
    asks = iter(range(len(at_rules) + 2))
    trivia = cursor.trivia_before(policy.span.line, at_line=policy.span.line, ask=(index, next(asks)),
                                  inline=header is not None)
    rules = tuple(dataclasses.replace(r, trivia=cursor.trivia_before(r.span.line, at_line=line,
                                                                     ask=(index, next(asks))))
                  for r, line in zip(policy.rules, at_rules))
    closing = cursor.trivia_before(policy.span.end_line, at_line=at_closing, ask=(index, next(asks)))
    return dataclasses.replace(policy, rules=rules, trivia=trivia, closing=closing)


class _Cursor:
    """Walks the file top to bottom, handing out the comments above and on each node's line."""

    def __init__(self, own: dict[int, str], inline: dict[int, str], lines: list[str],
                 last: dict[int, tuple[int, int]]):
        self.own, self.inline, self.lines, self.last = own, inline, lines, last
        self.line = 0  # last line already handed out

    def trivia_before(self, line: int, *, at_line: int | None, inline: bool = True,
                      ask: tuple[int, int] | None = None) -> A.Trivia:
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
        mine = at_line is not None and inline and (ask is None or self.last.get(at_line) == ask)
        comment = self.inline.pop(at_line, None) if mine else None
        self.line = max(self.line, line if at_line is not None else line - 1)
        return A.Trivia(leading, comment, blank)
