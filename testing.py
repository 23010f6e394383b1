"""Hypothesis strategies shipped to users: generate policies to test their own tooling and models.

    from hypothesis import given
    from slimfx.testing import policies

    @given(policies())
    def test_my_linter_accepts_every_policy(text): ...

`check_policy(model, policy, ...)` (slimfx/policy_check.py) is the property test for a policy on
a model: compile once, then compare compiled and original on drawn batch sizes, sequence lengths
and padding; a failure names the smallest failing input.

`policies()` draws text straight from the grammar (hypothesis.extra.lark.from_lark), then rewrites
the parts the grammar cannot constrain (parameter names and values, budgets, metric names) to
values the schema accepts, keeping the drawn layout; a `heal` gets a `drop` above it where its
policy removes no blocks, a policy keeps one `tokens unpad` at most, above its `tokens after`
rules (and half of those without one get one), and half the draws move removals above the other
rules. Only text that parse() accepts comes out. It is language-level text: selectors are random
names, so on a real model most draws select nothing (compile refuses them by name) — use it to
test tools that read policies (linters, formatters, diff tools), not a model: `role_rules()`
(role_rules.py) draws rules that bind on supported models, and `check_policy` tests a policy of
yours on a model. `bare_rules()` draws the rules of one such policy
with no `policy NAME { }` around them, as `compile(model, "quantize head int8")` takes them.
`invalid_policies()` (invalid_policies.py) draws policies with one mistake, and the error kind and
line parse() reports for it.
"""
from __future__ import annotations

import functools
import numbers
import re
import string

from hypothesis import assume, event, strategies as st
from lark import Token, Tree

from .dsl import ast as A
from .dsl.errors import SpecError
from .dsl.parser import lark_parser, parse
from .dsl.printer import format_value
from .dsl.schema import (ADAPTERS, FORMAT_BITS, FORMATS, HEAL_METHOD_PARAMS, INT_FORMATS, METRICS, SCHEMAS, SIZE_UNITS,
                         TOKEN_ACTIONS, ParamSpec)

__all__ = ["policies", "policy_asts", "bare_rules", "param_values", "grammar_text_strategy", "tiny_models",
           "role_rules", "invalid_policies", "InvalidPolicy", "MISTAKE_KINDS", "check_policy", "PolicyCheckError",
           "PolicyCheckResult"]

_CHECKER = ("check_policy", "PolicyCheckError", "PolicyCheckResult", "Draw", "DrawResult")


def __getattr__(name: str):
    # The checker imports torch; the policy strategies do not, so it loads on first use.
    if name in _CHECKER:
        from . import policy_check

        return getattr(policy_check, name)
    if name == "role_rules":  # role_rules.py reads this module's parameter strategies
        from .role_rules import role_rules

        return role_rules
    if name in ("invalid_policies", "InvalidPolicy", "MISTAKE_KINDS"):  # it edits policies() draws
        from . import invalid_policies

        return getattr(invalid_policies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_RULES_WITH_PARAMS = {"collapse", "drop", "adapt", "quantize", "precision", "tokens", "unpad", "keep", "heal"}


def _pad(text: str) -> str:
    # from_lark puts nothing between terminals, so keywords would run into names (`policyp`).
    return f" {text} "


@functools.lru_cache(maxsize=None)
def _reserved() -> frozenset[str]:
    words = {t.pattern.value for t in lark_parser().terminals if type(t.pattern).__name__ == "PatternStr"}
    return frozenset(words | set(FORMATS) | set(ADAPTERS) | set(TOKEN_ACTIONS) | set(SIZE_UNITS))


def _names() -> st.SearchStrategy[str]:
    return st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True).filter(lambda n: n not in _reserved())


def _terminal_strategies() -> dict[str, st.SearchStrategy[str]]:
    out: dict[str, st.SearchStrategy[str]] = {}
    for term in lark_parser().terminals:
        if type(term.pattern).__name__ == "PatternStr":
            out[term.name] = st.just(_pad(term.pattern.value))
    words = {"FORMAT": FORMATS, "ADAPTER": ADAPTERS, "ACTION": TOKEN_ACTIONS, "SIZE_UNIT": tuple(SIZE_UNITS)}
    for name, choices in words.items():
        out[name] = st.sampled_from(choices).map(_pad)
    out["NAME"] = _names().map(_pad)
    out["INT"] = st.integers(-40, 40).map(str).map(_pad)
    out["NUMBER"] = st.one_of(st.integers(0, 64).map(str), st.floats(0.01, 8, allow_nan=False).map(repr)).map(_pad)
    out["STRING"] = st.text(string.ascii_letters + string.digits + " ./-_", max_size=12).map(lambda s: f' "{s}" ')
    out["_NL"] = st.sampled_from(["\n", "\n\n", "\n    # a comment\n", "  # why\n", "\r\n"]).map(lambda s: f" {s} ")
    # from_lark may put an ignored terminal between any two tokens; a comment there would swallow
    # the rest of the line, so comments come only with line ends (above).
    out["COMMENT"] = st.just(" ")
    for name in lark_parser().ignore_tokens:  # the whitespace between tokens
        out.setdefault(name, st.sampled_from([" ", "\t", " \x0c "]))
    return out


@functools.lru_cache(maxsize=None)
def grammar_text_strategy() -> st.SearchStrategy[str]:
    """Raw text from the grammar: syntactically valid, parameters not yet schema-checked.
    Built once: from_lark compiles the grammar, which costs about 0.1 s."""
    from hypothesis.extra.lark import from_lark

    return from_lark(lark_parser(), explicit=_terminal_strategies())


# ---- schema-valid values -------------------------------------------------------------------


def param_values(spec: ParamSpec) -> st.SearchStrategy:
    """Values `spec` accepts, its default among them (`generate=0`, `dropout=0.0`)."""
    if spec.choices:
        return st.sampled_from(spec.choices)
    if spec.type is bool:
        return st.booleans()
    if spec.name == "group":
        return st.sampled_from([16, 32, 64, 128, 256])
    default = [st.just(spec.default)] if spec.default is not None and spec.valid(spec.default) else []
    if spec.type is int:
        return st.one_of(*default, st.integers(1, 64).filter(spec.valid))
    if spec.type is float:
        # Most float parameters are fractions of some range ((0, 0.5], (0, 1], [0, 1)): a value
        # out of range is scaled into it rather than thrown away (a filter discarded about a
        # third of the draws).
        scaled = st.floats(0.0, 64.0, exclude_min=True).map(
            lambda v: next((c for c in (v, v / 64, v / 128) if spec.valid(c)), None))
        return st.one_of(*default, scaled.filter(lambda v: v is not None))
    # names, and text that only a quoted string holds (a path with spaces, a quote, a backslash):
    # drawn as names alone, the printer's quoting and the lexer's strings were never exercised
    return st.one_of(st.text(string.ascii_letters, min_size=1, max_size=8),
                     st.text(string.ascii_letters + "./-_ é\t\"\\", min_size=1, max_size=12).filter(str.strip))


@st.composite
def _params_text(draw, key: str, count: int, sep: str = " ") -> str:
    schema = SCHEMAS[key]
    names = draw(st.permutations(list(schema)))[:count]
    values = _compatible(draw, key, {n: draw(param_values(schema[n])) for n in names})
    return sep.join(f"{n}={format_value(v)}" for n, v in values.items())


def _compatible(draw, key: str, values: dict) -> dict:
    """`values` with what validate.py rejects in combination taken out or fixed (mirrors its checks)."""
    def drop_one_of(a: str, b: str):
        if {a, b} <= set(values):
            del values[draw(st.sampled_from([a, b]))]

    if key in ("collapse.auto", "drop.auto"):
        drop_one_of("ratio", "count")  # neither is fine: ratio's default applies
    if key == "drop.auto" and "max_run" in values:
        values["score"] = "angular"  # max_run ranks runs by angular distance only
    if key == "adapt":
        drop_one_of("from", "init")  # a loaded adapter has no init
        if values.get("init") == "error" and values.get("merge") is True:
            del values[draw(st.sampled_from(["init", "merge"]))]  # packed weights take no merge
    # GPTQ's options: taken out, or GPTQ chosen for them (a false flag asks for nothing)
    gptq_only = [n for n in ("true_sequential", "refit", "act_order", "damp", "sequential")
                 if n in values and (values[n] is not False or n == "sequential")]
    if gptq_only and values.get("method") != "gptq":
        if draw(st.booleans()):
            for n in gptq_only:
                del values[n]
        else:
            values["method"] = "gptq"
    if values.get("true_sequential") is True and values.get("sequential") is False:
        values.pop("sequential")  # true_sequential refines sequential calibration
    if key in ("quantize", "choice") and values.get("zero") == "float":
        values["sym"] = False  # a float zero point is asymmetric
    if key == "heal":  # method is required, and picks which other parameters apply
        method = values.pop("method", None) or draw(param_values(SCHEMAS["heal"]["method"]))
        values = {"method": method, **{n: v for n, v in values.items() if HEAL_METHOD_PARAMS[n] == method}}
    return values


@st.composite
def _budget_text(draw, formats: list[str]) -> str:
    if draw(st.booleans()):
        smallest = min(FORMAT_BITS[f] for f in formats)  # `keep` is 32 bits, not 16: 16–31 were redrawn
        return f" budget avg_bits<={format_value(draw(st.floats(smallest, 32, allow_nan=False)))} "
    unit = draw(st.sampled_from(["", *SIZE_UNITS]))
    return f" budget bytes<={draw(st.integers(1, 10**6))}{unit} "


# ---- rewriting drawn text ------------------------------------------------------------------


def _offsets(node) -> tuple[int, int]:
    if isinstance(node, Token):
        return node.start_pos, node.end_pos
    return node.meta.start_pos, node.meta.end_pos


@st.composite
def _schema_edits(draw, tree: Tree) -> list[tuple[int, int, str]]:
    """(start, end, replacement) edits that make every rule of `tree` schema-valid."""
    edits: list[tuple[int, int, str]] = []
    for rule in tree.iter_subtrees():
        if rule.data not in _RULES_WITH_PARAMS:
            continue
        key = _key(rule)
        params = [c for c in rule.children if isinstance(c, Tree) and c.data == "param"]
        edits += _replace_params(draw, params, key, rule)
        formats = draw(_distinct_formats(rule)) if rule.data == "precision" else None
        for child in rule.children:
            edits += _edit_part(draw, rule, child, formats)
    edits += draw(_removal_for_heal(tree))
    for sl in tree.find_data("slice"):
        step = sl.children[2]
        if step is not None and int(step) == 0:
            edits.append((*_offsets(step), "1"))
    return edits


@st.composite
def _removal_for_heal(draw, tree: Tree) -> list[tuple[int, int, str]]:
    """A `drop` above the first rule of each policy that has a `heal` and no `collapse` or `drop`:
    `heal` repairs what one removed, and random rule lists seldom hold both. Above the first rule,
    not the heal: a drop below a `quantize` or `adapt` is an illegal order (such draws were redrawn)."""
    edits = []
    for policy in tree.find_data("policy"):
        rules = [c for c in policy.children if isinstance(c, Tree)]
        kinds = [c.data for c in rules]
        if "heal" in kinds and not {"collapse", "drop"} & set(kinds):
            start = _offsets(rules[0])[0]
            edits.append((start, start, f"drop {draw(_names())}[{draw(st.integers(0, 40))}]\n    "))
    return edits


def _key(rule: Tree) -> str:
    if rule.data == "tokens":
        return f"tokens.{rule.children[1]}"
    if rule.data == "unpad":
        return "tokens.unpad"  # no parameters: any drawn ones are removed
    if rule.data == "quantize" and str(rule.children[1]) not in INT_FORMATS:
        return "keep"  # non-integer formats take no parameters
    return str(rule.data)


def _replace_params(draw, params: list[Tree], key: str, rule: Tree) -> list[tuple[int, int, str]]:
    if not params and key == "heal":  # `heal` needs its method: write it after the keyword
        # with some options of its own: with the method alone, LoRA's (distill=true,
        # schedule=cosine) came up a few times in 2,000 draws
        end = _offsets(rule)[1]
        return [(end, end, f" {draw(_params_text(key, draw(st.integers(0, 3))))} ")]
    if not params and key in ("quantize", "adapt") and (count := draw(st.integers(0, 3))):
        # The grammar seldom draws parameters, so options such as refit=true (needing method=gptq
        # beside it) or init=error were all but never drawn: give a bare rule some of its own.
        end = _offsets(rule)[1]
        return [(end, end, f" {draw(_params_text(key, count))} ")]
    if not params:
        return []
    start, end = _offsets(params[0])[0], _offsets(params[-1])[1]
    return [(start, end, draw(_params_text(key, len(params))))]


def _choices(rule: Tree) -> list[Tree]:
    return [c for c in rule.children if isinstance(c, Tree) and c.data == "choice"]


@st.composite
def _distinct_formats(draw, rule: Tree) -> dict[int, str]:
    """A format per `choose` candidate (by position), no two alike, for the first len(FORMATS)
    candidates (the rest are removed): the grammar drew repeats ("format `int8` is listed twice"),
    which were redrawn."""
    return dict(enumerate(draw(st.permutations(FORMATS))[:len(_choices(rule))]))


def _edit_part(draw, rule: Tree, child, formats: dict[int, str] | None = None) -> list[tuple[int, int, str]]:
    if isinstance(child, Tree) and child.data == "auto":
        count = len([c for c in child.children if c is not None])
        inner = draw(_params_text(f"{rule.data}.auto", count, sep=", "))
        return [(*_offsets(child), f" auto({inner}) ")]
    if isinstance(child, Tree) and child.data == "choice":
        index = next(i for i, c in enumerate(_choices(rule)) if c is child)  # equal trees are not the same one
        if formats and index >= len(formats):  # more candidates than formats: the rest go, comma and all
            return [(_offsets(_choices(rule)[index - 1])[1], _offsets(child)[1], "")]
        fmt = formats[index] if formats else str(child.children[0])
        params = [c for c in child.children[1:] if isinstance(c, Tree)]
        edits = _replace_params(draw, params, "choice" if fmt in INT_FORMATS else "keep", rule)
        return edits + [(*_offsets(child.children[0]), f" {fmt} ")]
    if isinstance(child, Tree) and child.data.startswith("budget"):
        used = list(formats.values()) if formats else [str(c.children[0]) for c in _choices(rule)]
        return [(*_offsets(child), draw(_budget_text(used)))]
    if isinstance(child, Token) and child.type == "NAME" and rule.data == "precision":
        return [(*_offsets(child), f" {draw(st.sampled_from(METRICS))} ")]  # the metric
    return []


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _unique_policy_names(text: str, tree: Tree) -> list[tuple[int, int, str]]:
    return [(*_offsets(p.children[0]), f" {p.children[0]}_{i} ") for i, p in enumerate(tree.find_data("policy"))]


def _removals_first(text: str) -> str:
    """`text` with every `collapse`/`drop` moved above the other rules of its policy, which keep
    their order (and the lines keep their comments). Removals must precede `heal`, `adapt`,
    `quantize` and `precision`, and random orders seldom do: most such draws would be redrawn."""
    edits = []
    for policy in lark_parser().parse(text).find_data("policy"):
        rules = [c for c in policy.children if isinstance(c, Tree)]
        moved = sorted(rules, key=lambda r: r.data not in ("collapse", "drop"))
        edits += [(*_offsets(old), text[slice(*_offsets(new))]) for old, new in zip(rules, moved) if old is not new]
    return _apply(text, edits)


@st.composite
def _one_unpad_first(draw, text: str) -> str:
    """`text` with one `tokens unpad` at most per policy, above the policy's first `tokens after`
    rule: the grammar draws any number of them anywhere, and check.py rejects all but that. Half
    the policies with a `tokens after` and no `tokens unpad` get one: random rule lists seldom
    hold both."""
    edits = []
    for policy in lark_parser().parse(text).find_data("policy"):
        rules = [c for c in policy.children if isinstance(c, Tree)]
        unpads = [r for r in rules if r.data == "unpad"]
        edits += [(*_offsets(r), "") for r in unpads[1:]]
        after = next((r for r in rules if r.data == "tokens"), None)
        if after is None:
            continue
        start = _offsets(after)[0]
        if not unpads and draw(st.booleans()):
            edits.append((start, start, "tokens unpad\n    "))
        elif unpads and rules.index(after) < rules.index(unpads[0]):
            edits += [(*_offsets(unpads[0]), ""), (start, start, text[slice(*_offsets(unpads[0]))] + "\n    ")]
    return _apply(text, edits)


def _quantize_for_error_init(text: str) -> str:
    """`quantize <its selector> int4` above each `adapt … init=error` that no `quantize` or
    `precision` precedes: it starts from the error a quantize left, and check.py refuses it
    alone, so every draft that drew it was redrawn and init=error never came up."""
    edits = []
    for policy in lark_parser().parse(text).find_data("policy"):
        quantized = False
        for rule in (c for c in policy.children if isinstance(c, Tree)):
            quantized = quantized or rule.data in ("quantize", "precision")
            params = [c for c in rule.children if isinstance(c, Tree) and c.data == "param"]
            if rule.data == "adapt" and not quantized and any(
                    re.fullmatch(r"init\s*=\s*error", text[slice(*_offsets(p))]) for p in params):
                start = _offsets(rule)[0]
                edits.append((start, start, f"quantize {text[slice(*_offsets(rule.children[0]))]} int4\n    "))
    return _apply(text, edits)


@st.composite
def policies(draw) -> str:
    """Valid policy text, drawn from the grammar: one policy or more (text of comments alone, which
    `slimfx check` refuses as holding no policy, was one draw in eight). Layout, comments and
    blank lines vary."""
    raw = draw(grammar_text_strategy())
    tree = lark_parser().parse(raw)
    if not any(tree.find_data("policy")):  # comments and blank lines alone: `slimfx check` refuses them
        event("policies(): redrawn, no policy")
        assume(False)
    text = _apply(raw, draw(_schema_edits(tree)) + _unique_policy_names(raw, tree))
    text = _quantize_for_error_init(draw(_one_unpad_first(text)))
    if draw(st.booleans()):  # else the drawn order stands, e.g. `keep` or `tokens` above `collapse`
        text = _removals_first(text)
    try:
        parse(text)
    except SpecError as e:
        # What the schema cannot see rule by rule (e.g. `collapse` after `quantize`) is redrawn,
        # named in hypothesis' statistics (`pytest --hypothesis-show-statistics`): a rewrite that
        # broke would show as a growing share of one kind, where it only shrank coverage unseen.
        event(f"policies(): redrawn, {e.kind}")
        assume(False)
    return text


@st.composite
def bare_rules(draw) -> str:
    """Rules alone, as `compile(model, text)` and `parse(text, bare=True)` take them: what is
    between the braces of the first policy with rules of a `policies()` draw (its rules in their
    order, so valid together, with their comments, blank lines and spacing)."""
    text = draw(policies())
    found = list(lark_parser().parse(text).find_data("policy"))  # one at least: policies() draws one
    # The first policy that has rules: the grammar draws `rule*`, and a third of first policies
    # had none, so a third of the draws were the empty text. It stays in one draw of eight of
    # those (the empty text is input too); the others are redrawn.
    policy = next((p for p in found if any(isinstance(c, Tree) for c in p.children)), None)
    if policy is None and draw(st.integers(0, 7)) != 5:  # not 0: hypothesis favours the ends
        event("bare_rules(): redrawn, no rules")
        assume(False)
    policy = policy or found[0]
    name = policy.children[0]
    start = text.index("{", name.end_pos) + 1
    end = text.rindex("}", start, policy.meta.end_pos)
    return text[start:end].lstrip(" \t")  # the rest of the `policy NAME {` line


def policy_asts() -> st.SearchStrategy[A.Spec]:
    """Parsed Specs of `policies()`."""
    return policies().map(parse)


# ---- models --------------------------------------------------------------------------------


def tiny_models(archs=None, *, max_layers: int = 3) -> st.SearchStrategy:
    """Small random-init transformers models (slimfx.models.LoadedModel) with example inputs.

    Covers every architecture slimfx supports (decoders and encoders) unless `archs` narrows it;
    layer count and seed vary. Each draw builds a fresh model (a few hundred ms), and compiling it
    traces it again (a second or two): `slimfx.passes.capture_cache.share_traces()` before the
    test reuses one trace per architecture and depth over each draw's weights.
    """
    from .models import TINY_ARCHS, tiny

    if archs is not None and not isinstance(archs, str) and not isinstance(archs, (list, tuple, set, frozenset)):
        raise TypeError(f"tiny_models(archs=...) takes an architecture name or a list of them, got the "
                        f"{type(archs).__name__} {archs!r}; known: {', '.join(TINY_ARCHS)}")
    if isinstance(archs, (set, frozenset)):  # in a fixed order: a seeded run draws the same models
        archs = sorted(archs)
    choices = (archs,) if isinstance(archs, str) else tuple(archs) if archs is not None else TINY_ARCHS
    unknown = sorted(set(choices) - set(TINY_ARCHS))
    if unknown:
        raise ValueError(f"unknown architectures {unknown}; known: {', '.join(TINY_ARCHS)}")
    if not choices:
        raise ValueError(f"tiny_models(archs=[]) has nothing to draw; name some of {', '.join(TINY_ARCHS)}, "
                         "or leave archs out for all")
    if isinstance(max_layers, bool) or not isinstance(max_layers, numbers.Integral) or max_layers < 1:  # numpy ints too
        raise ValueError(f"max_layers must be a whole number of at least 1, got {max_layers!r}")
    # Two layers or more unless asked for fewer: one block is a corner of its own.
    return st.builds(lambda arch, layers, seed: tiny(arch, layers=layers, seed=seed),
                     st.sampled_from(choices), st.integers(min(2, int(max_layers)), int(max_layers)), st.integers(0, 2**16))
