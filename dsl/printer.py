"""AST -> canonical policy text (`slimfx fmt`). parse(format_spec(s)) == s for every valid Spec.

Canonical form: four-space indent, one space between a rule's parts, parameters in schema order,
a blank line between policies, and every comment kept where it was.
"""
from __future__ import annotations

import re

from . import ast as A

__all__ = ["format_spec", "format_policy", "format_rule", "format_selector", "format_value", "format_choice"]

INDENT = "    "
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def format_spec(spec: A.Spec) -> str:
    """The whole file. An empty spec with no comments prints as the empty string."""
    chunks = [format_policy(p) for p in spec.policies]
    tail = _trivia_lines(spec.trailing, "")
    if tail and chunks and spec.trailing.blank_before:
        tail = [""] + tail
    text = "\n\n".join(chunks)
    if tail:
        text = "\n".join(([text] if text else []) + tail)
    return text + "\n" if text else ""


def format_policy(policy: A.Policy) -> str:
    lines = _trivia_lines(policy.trivia, "")
    lines.append(f"policy {policy.name} {{" + _inline(policy.trivia))
    for i, rule in enumerate(policy.rules):
        if i and rule.trivia.blank_before:
            lines.append("")
        lines += _trivia_lines(rule.trivia, INDENT)
        lines.append(INDENT + format_rule(rule) + _inline(rule.trivia))
    if policy.rules and policy.closing.blank_before and policy.closing.leading:
        lines.append("")
    lines += _trivia_lines(policy.closing, INDENT)
    lines.append("}" + _inline(policy.closing))
    return "\n".join(lines)


def format_rule(rule: A.Rule) -> str:
    """One rule on one line, without comments."""
    if isinstance(rule, A.Heal):  # `heal` and `tokens unpad` take no selector
        return _join("heal", rule.params)
    if isinstance(rule, A.Unpad):
        return _join("tokens unpad", rule.params)
    sel = format_selector(rule.selector)
    if isinstance(rule, A.BLOCK_RULES):
        auto = f" auto({', '.join(_param(p) for p in rule.auto.params)})" if rule.auto else ""
        head = f"{rule.kind} {sel}{auto}"
    elif isinstance(rule, A.Adapt):
        head = f"adapt {sel} {rule.method}"
    elif isinstance(rule, A.Quantize):
        head = f"quantize {sel} {rule.format}"
    elif isinstance(rule, A.Precision):
        choices = ", ".join(format_choice(c) for c in rule.choices)
        head = f"precision {sel} choose {{{choices}}} {_budget(rule.budget)} by {rule.metric}"
    elif isinstance(rule, A.Tokens):
        head = f"tokens after {sel} {rule.action}"
    elif isinstance(rule, A.Keep):
        head = f"keep {sel}"
    else:
        raise TypeError(f"not a rule: {rule!r}")
    return _join(head, rule.params)


def format_selector(selector: A.Selector) -> str:
    """`blocks[0:4].attn.{q,v} : Linear`."""
    text = _path(selector.path)
    return f"{text} : {selector.class_filter}" if selector.class_filter else text


def format_value(value: A.Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # `alpha=32`, not `alpha=32.0`: the schema makes it a float again
    if isinstance(value, (int, float)):
        return repr(value)
    if _IDENT.match(value) and value not in ("true", "false"):
        return value
    return f'"{_escaped(value)}"'


def _escaped(text: str) -> str:
    """A string's characters as a policy file writes them: a quote and a backslash escaped, and
    every character that prints as nothing or as a line break (a tab, U+2028, a no-break space)
    as its Python escape, which the parser reads back (printed raw, a tab or U+2028 was invisible
    in the file, and U+2028 broke its lines for editors)."""
    return "".join("\\" + ch if ch in '\\"' else ch if ch.isprintable() or ch == " "
                   else ch.encode("unicode_escape").decode("ascii") for ch in text)


# ---- helpers -------------------------------------------------------------------------------


def _path(path: A.Path) -> str:
    return ".".join(_segment(s) for s in path.segments)


def _segment(seg) -> str:
    if isinstance(seg, A.Name):
        return seg.name + _index(seg.index)
    if isinstance(seg, A.Star):
        return "*"
    if isinstance(seg, A.GlobStar):
        return "**"
    return "{" + ",".join(_path(p) for p in seg.options) + "}"


def _index(index) -> str:
    if index is None:
        return ""
    if isinstance(index, A.Item):
        return f"[{index.index}]"
    bound = lambda v: "" if v is None else str(v)  # noqa: E731
    step = f":{index.step}" if index.step is not None else ""
    return f"[{bound(index.start)}:{bound(index.stop)}{step}]"


def format_choice(choice: A.FormatChoice) -> str:
    """`int4 group=32`: one candidate of `precision … choose {…}`."""
    return _join(choice.format, choice.params)


def _budget(budget: A.Budget) -> str:
    return f"budget {budget.metric}<={format_value(budget.limit)}{budget.unit or ''}"


def _param(p: A.Param) -> str:
    return f"{p.name}={format_value(p.value)}"


def _join(head: str, params: tuple[A.Param, ...]) -> str:
    return " ".join([head, *(_param(p) for p in params)])


def _trivia_lines(trivia: A.Trivia, indent: str) -> list[str]:
    return [indent + c if c else "" for c in trivia.leading]  # "": a blank line kept between comments


def _inline(trivia: A.Trivia) -> str:
    return f"  {trivia.inline}" if trivia.inline else ""
