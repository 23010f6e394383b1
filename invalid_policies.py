"""`invalid_policies()`: policies with one mistake in them, and the error slimfx reports for it,
for property tests of tools that must reject bad policies (a linter, an editor plug-in, a review
bot) or that show slimfx's errors to users.

    from hypothesis import given
    from slimfx.testing import invalid_policies

    @given(invalid_policies())
    def test_my_linter_rejects_what_slimfx_rejects(bad):
        findings = my_linter(bad.text)
        assert any(f.line == bad.line for f in findings), bad.kind

Each draw is a `policies()` draw (valid text, layout and comments varying) with one edit of the
kind a person makes: a stray character, a misspelt keyword, a parameter the rule does not take, a
parameter without its value, a value of the wrong type or out of range, two parameters that do not
go together, something written twice, a rule in an order that cannot work. `kind` is the error
kind (dsl/errors.py, ERROR_KINDS) and `line` the 1-based line that `slimfx.dsl.parse(text)`
reports for it: every diagnostic it raises has that kind, and one of them points at that line
(tests/test_invalid_policies.py checks both on every draw). Where the drawn policy has no rule to
edit, a small policy is added to the text for the edit. `bare=True` edits a `bare_rules()` draw
(rules alone, as `compile(model, text)` takes them) the same way. An edit that the text around it makes
valid after all (a misspelling that is another keyword) is redrawn, named as a hypothesis event.
"""
from __future__ import annotations

from collections.abc import Iterable

import re
from dataclasses import dataclass

from hypothesis import assume, event, strategies as st
from lark import Tree

from .dsl.errors import SpecError
from .dsl.parser import lark_parser, parse
from .dsl.printer import format_value
from .dsl.schema import FORMATS, INT_FORMATS, INT_ONLY_PARAMS, SCHEMAS, ParamSpec
from .testing import _apply, _key, _names, _offsets, _reserved, bare_rules, policies

__all__ = ["invalid_policies", "InvalidPolicy", "MISTAKE_KINDS"]

_RULES = ("collapse", "drop", "adapt", "quantize", "precision", "tokens", "unpad", "keep", "heal")
_ANY_PARAM = frozenset(name for schema in SCHEMAS.values() for name in schema)


@dataclass(frozen=True)
class InvalidPolicy:
    """Policy text with one mistake; parse(text) raises a SpecError of `kind` at `line`."""

    text: str
    kind: str
    line: int


# ---- where an edit can go ------------------------------------------------------------------


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _rules(tree: Tree) -> list[Tree]:
    return [r for p in tree.find_data("policy") for r in p.children if isinstance(r, Tree) and r.data in _RULES]


def _params(rule: Tree) -> list[tuple[Tree, ParamSpec | None]]:
    """The rule's `name=value` parameters, its auto's and its format choices', each with its spec
    (None for a name the schema does not hold)."""
    out = []
    for part, key in [(rule, _key(rule))] + [
            (c, f"{rule.data}.auto" if c.data == "auto" else "choice" if str(c.children[0]) in INT_FORMATS else "keep")
            for c in rule.children if isinstance(c, Tree) and c.data in ("auto", "choice")]:
        for p in (c for c in part.children if isinstance(c, Tree) and c.data == "param"):
            out.append((p, SCHEMAS.get(key, {}).get(str(p.children[0]))))
    return out


def _keyword_end(text: str, rule: Tree) -> int:
    start = _offsets(rule)[0]
    return start + len(re.match(r"[a-z]+", text[start:]).group())


def _fresh_policy_name(tree: Tree) -> str:
    taken = {str(p.children[0]) for p in tree.find_data("policy")}
    return next(f"extra{i}" for i in range(len(taken) + 1) if f"extra{i}" not in taken)


def _with_rule(text: str, tree: Tree, rule: str) -> str:
    """`text` with a policy of one rule added at its end: for an edit the draw has no rule for."""
    return f"{text.rstrip(' ')}\npolicy {_fresh_policy_name(tree)} {{\n    {rule}\n}}\n"


_ADAPT = "adapt extra lora rank=8 alpha=16"


# ---- one mistake of each kind: (edits, line) from the drawn text, or None where it has no place


def _misspelt(draw, word: str) -> str:
    """`word` with one letter dropped, doubled, swapped with the next or changed."""
    i = draw(st.integers(0, len(word) - 1))
    how = draw(st.sampled_from(["drop", "double", "swap", "change"] if len(word) > 1 else ["double", "change"]))
    if how == "drop":
        return word[:i] + word[i + 1:]
    if how == "double":
        return word[:i] + word[i] + word[i:]
    if how == "swap":
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + draw(st.sampled_from([c for c in "aeiouxyz" if c != word[i]])) + word[i + 1:]


def _syntax(draw, text, tree):
    rules = _rules(tree)
    if not rules:
        return None
    rule = draw(st.sampled_from(rules))
    at = draw(st.sampled_from([_keyword_end(text, rule), _offsets(rule)[1]]))
    return [(at, at, f" {draw(st.sampled_from('@$%&?;!~|'))} ")], _line(text, at)


def _unknown_keyword(draw, text, tree):
    # the rule's keyword, or its format, adapter or action
    words = [(_offsets(r)[0], _keyword_end(text, r)) for r in _rules(tree)]
    words += [_offsets(t) for r in _rules(tree) for t in r.scan_values(lambda v: getattr(v, "type", "") in
                                                                        ("FORMAT", "ADAPTER", "ACTION"))]
    if not words:
        return None
    start, end = draw(st.sampled_from(words))
    wrong = _misspelt(draw, text[start:end])
    if wrong in _reserved():  # a misspelling that is itself a word of the language
        event(f"invalid_policies(): redrawn, unknown-keyword misspelt as `{wrong}`")
    assume(wrong not in _reserved())
    return [(start, end, wrong)], _line(text, start)


def _unknown_parameter(draw, text, tree):
    rules = _rules(tree)
    if not rules:
        return None
    rule = draw(st.sampled_from(rules))
    name = draw(_names().filter(lambda n: n not in _ANY_PARAM))
    end = _offsets(rule)[1]
    return [(end, end, f" {name}=1")], _line(text, end)


def _missing_value(draw, text, tree):
    params = [p for r in _rules(tree) for p, spec in _params(r) if spec is not None]
    if not params:
        return None
    param = draw(st.sampled_from(params))
    return [(_offsets(param.children[0])[1], _offsets(param)[1], "")], _line(text, _offsets(param)[0])


def _wrong_values(spec: ParamSpec) -> list[str]:
    if spec.type is bool:
        return ["yes", "1", '"true"']
    if spec.choices:
        return ["1", "0.5", "true"]
    if spec.type is int:
        return ["1.5", "true", "abc", '"8"']
    if spec.type is float:
        return ["true", "abc", '"0.5"']
    return []  # a name or a string: any value is one


def _wrong_type(draw, text, tree):
    params = [(p, spec) for r in _rules(tree) for p, spec in _params(r) if spec is not None and _wrong_values(spec)]
    if not params:
        return None
    param, spec = draw(st.sampled_from(params))
    return [(*_offsets(param.children[1]), draw(st.sampled_from(_wrong_values(spec))))], _line(text, _offsets(param)[0])


_OUT_OF_RANGE = {int: [0, -1, -8, 2, 3, 48, 100, 10**6], float: [0.0, -0.5, -1.0, 0.75, 1.0, 1.5, 2.0, 1e9]}


def _out_of_range(draw, text, tree):
    params = []
    for r in _rules(tree):
        for p, spec in _params(r):
            if spec is None or spec.type is bool:
                continue
            if spec.choices:  # a name close to no choice (a close one is read as a misspelling)
                params.append((p, ["qqq", "zzz_x"]))
            elif spec.type in (int, float):
                params.append((p, [format_value(v) for v in _OUT_OF_RANGE[spec.type] if not spec.valid(v)]))
    params = [(p, values) for p, values in params if values]
    if not params:
        return None
    param, values = draw(st.sampled_from(params))
    return [(*_offsets(param.children[1]), draw(st.sampled_from(values)))], _line(text, _offsets(param)[0])


def _invalid_combination(draw, text, tree):
    """Parameters that cannot go together: `ratio` with `count`, `group` on a float format, a
    loaded adapter with an init, or a LoRA heal's option on a linear heal."""
    edits = []
    for rule in _rules(tree):
        auto = next((c for c in rule.children if isinstance(c, Tree) and c.data == "auto"), None)
        line = _line(text, _offsets(rule)[0])
        if auto is not None:
            edits.append(([(*_offsets(auto), " auto(ratio=0.25, count=2) ")], line))
        if rule.data == "quantize":
            fmt = rule.children[1]
            float_format = draw(st.sampled_from([f for f in FORMATS if f not in INT_FORMATS]))
            int_only = any(str(p.children[0]) in INT_ONLY_PARAMS for p, _ in _params(rule))
            end = _offsets(rule)[1]  # its own `group` or another integer-only option, or one added
            edits.append(([(*_offsets(fmt), float_format)] + ([] if int_only else [(end, end, " group=32")]), line))
        if rule.data == "adapt":
            params = [p for p, _ in _params(rule)]
            span = (_offsets(params[0])[0], _offsets(params[-1])[1]) if params else (_offsets(rule)[1],) * 2
            edits.append(([(*span, ' from="adapters/a" init=gaussian')], line))
        if rule.data == "heal":
            edits.append(([(*_offsets(rule), "heal method=linear steps=10")], line))
    return draw(st.sampled_from(edits)) if edits else None


def _duplicate(draw, text, tree):
    found = []
    for rule in _rules(tree):
        for p, _ in _params(rule):
            if p in rule.children:  # the rule's own, not its auto's or a choice's
                end = _offsets(rule)[1]
                found.append(([(end, end, f" {text[slice(*_offsets(p))]}")], _line(text, end)))
    policies_ = list(tree.find_data("policy"))
    if len(policies_) > 1:
        later = draw(st.sampled_from(policies_[1:]))
        name = later.children[0]
        found.append(([(*_offsets(name), str(policies_[0].children[0]))], _line(text, _offsets(name)[0])))
    return draw(st.sampled_from(found)) if found else None


def _illegal_order(draw, text, tree):
    """A `heal` above everything (it repairs what a removal before it removed), or a `drop` below a
    weight rule (blocks are removed from full-precision, adapter-free weights)."""
    found = []
    for policy in tree.find_data("policy"):
        rules = [r for r in policy.children if isinstance(r, Tree)]
        if rules:
            start = _offsets(rules[0])[0]
            found.append(([(start, start, "heal method=linear\n    ")], _line(text, start)))
        weight = next((r for r in rules if r.data in ("quantize", "adapt", "precision")), None)
        if weight is not None:
            end = _offsets(weight)[1]
            found.append(([(end, end, f"\n    drop {draw(_names())}[0]")], _line(text, end) + 1))
    return draw(st.sampled_from(found)) if found else None


# What each kind edits, and the rule a policy added for it holds where the draw has none to edit.
_MISTAKES = {
    "syntax": (_syntax, _ADAPT),
    "unknown-keyword": (_unknown_keyword, _ADAPT),
    "unknown-parameter": (_unknown_parameter, _ADAPT),
    "missing-value": (_missing_value, _ADAPT),
    "wrong-type": (_wrong_type, _ADAPT),
    "out-of-range": (_out_of_range, _ADAPT),
    "invalid-combination": (_invalid_combination, "quantize extra int8"),
    "duplicate": (_duplicate, _ADAPT),
    "illegal-order": (_illegal_order, _ADAPT),
}
MISTAKE_KINDS = tuple(_MISTAKES)


# Bare rules are edited inside this wrapper (the edits find their rules in a policy), then unwrapped.
_WRAP = ("policy bare {\n", "\n}\n")


@st.composite
def _invalid(draw, kinds: tuple[str, ...], bare: bool) -> InvalidPolicy:
    kind = draw(st.sampled_from(kinds))
    mistake, fallback = _MISTAKES[kind]
    body = draw(bare_rules()) if bare else ""
    text = f"{_WRAP[0]}{body}{_WRAP[1]}" if bare else draw(policies())
    tree = lark_parser().parse(text)
    found = mistake(draw, text, tree)
    if found is None:  # nothing in the draw to edit: a rule (in a policy of its own) is added for it
        text = f"{_WRAP[0]}{body.rstrip(' ')}\n{fallback}{_WRAP[1]}" if bare else _with_rule(text, tree, fallback)
        tree = lark_parser().parse(text)
        found = mistake(draw, text, tree)
    edits, line = found
    bad = _apply(text, edits)
    if bare:  # no edit touches the wrapper: the one policy's name is never renamed, nothing follows `}`
        assert bad.startswith(_WRAP[0]) and bad.endswith(_WRAP[1]), bad
        bad, line = bad[len(_WRAP[0]):-len(_WRAP[1])], line - 1
    try:
        parse(bad, bare=bare)
    except SpecError:
        return InvalidPolicy(bad, kind, line)
    event(f"invalid_policies(): redrawn, {kind} accepted")  # e.g. a misspelling that is another name
    assume(False)


def invalid_policies(kinds=None, *, bare: bool = False) -> st.SearchStrategy[InvalidPolicy]:
    """InvalidPolicy draws (text, kind, line) of the given error kinds (all of MISTAKE_KINDS by
    default). With bare=True the text is rules alone, as `compile(model, text)` and
    `parse(text, bare=True)` take them (a `bare_rules()` draw with the mistake in it)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    if kinds is not None and not isinstance(kinds, Iterable):  # kinds=3: "'int' object is not iterable"
        raise TypeError(f"invalid_policies(kinds=...) is a kind or a collection of them (of {', '.join(MISTAKE_KINDS)}), "
                        f"not {kinds!r}")
    # A set's order changes with PYTHONHASHSEED: seeded runs and database replays drew other kinds.
    kinds = MISTAKE_KINDS if kinds is None else tuple(sorted(set(kinds), key=str) if isinstance(kinds, (set, frozenset))
                                                      else kinds)
    unknown = [k for k in kinds if k not in _MISTAKES]
    if unknown or not kinds:
        raise ValueError(f"invalid_policies(kinds=...) draws the kinds {', '.join(MISTAKE_KINDS)}; "
                         f"got {', '.join(map(repr, unknown)) or 'none'}")
    if not isinstance(bare, bool):
        raise TypeError(f"invalid_policies(bare=...) is True or False, not {bare!r}")
    return _invalid(kinds, bare)
