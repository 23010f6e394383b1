"""Schema checks of one rule at a time: parameter names, types, ranges, combinations.

Runs right after the tree becomes an AST. It returns the same Spec with every value coerced to
its declared type (`alpha=32` becomes 32.0) and parameters in schema order, so that two ways of
writing one rule give equal ASTs. All problems of the file are reported together.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable

from . import ast as A
from .errors import Diagnostic, SpecError, did_you_mean, source_lines
from .printer import format_choice, format_value
from .schema import (DEFAULT_GROUP, FORMAT_BITS, HEAL_METHOD_PARAMS, INT_FORMATS, INT_ONLY_PARAMS, METRICS,
                     SCHEMAS, ParamSpec, schema_key)

__all__ = ["validate_spec"]

_RULE_WORDS = {"tokens.prune": "tokens … prune", "tokens.merge": "tokens … merge", "tokens.unpad": "`tokens unpad`",
               "collapse.auto": "auto(…) of `collapse`", "drop.auto": "auto(…) of `drop`",
               "choice": "a `choose` format"}


class _Problems(list):
    def __init__(self, source: str = ""):
        super().__init__()
        self.source = source  # for the few parts the AST keeps no span of (a `precision` metric)

    def add(self, kind: str, message: str, span: A.Span, hint: str | None = None, width: int | None = None):
        w = width if width is not None else max(1, span.end_column - span.column if span.end_line == span.line else 1)
        self.append(Diagnostic(kind, message, span.line, span.column, w, hint))


def validate_spec(spec: A.Spec) -> A.Spec:
    problems = _Problems(spec.source)
    policies = tuple(_validate_policy(p, problems) for p in spec.policies)
    if problems:
        raise SpecError(problems, spec.source, spec.filename)
    return dataclasses.replace(spec, policies=policies)


def _validate_policy(policy: A.Policy, problems: _Problems) -> A.Policy:
    return dataclasses.replace(policy, rules=tuple(_validate_rule(r, problems) for r in policy.rules))


def _validate_rule(rule, problems: _Problems):
    if rule.selector is not None:  # `heal` and `tokens unpad` have none
        _check_selector(rule.selector, problems)
    changes = {"params": _coerce_params(rule, rule.params, problems)}
    if getattr(rule, "auto", None) is not None:
        changes["auto"] = dataclasses.replace(rule.auto, params=_coerce_params(rule.auto, rule.auto.params, problems))
        _check_auto(changes["auto"], rule.auto.params, problems)
    if isinstance(rule, A.Quantize):
        _check_format_params(rule.format, changes["params"], rule.params, problems)
    if isinstance(rule, A.Adapt):
        _check_adapt(changes["params"], problems)
    if isinstance(rule, A.Heal):
        _check_heal(rule, changes["params"], problems)
    if isinstance(rule, A.Precision):
        changes["choices"] = tuple(_validate_choice(c, problems) for c in rule.choices)
        _check_precision(rule, changes["choices"], problems)
    if isinstance(rule, A.Precision) or (isinstance(rule, A.Quantize) and rule.format in INT_FORMATS):
        _check_gptq_only(changes["params"], rule.params, problems)  # a float format's are refused above
    return dataclasses.replace(rule, **changes)


# ---- parameters ----------------------------------------------------------------------------


def _coerce_params(node, params: Iterable[A.Param], problems: _Problems) -> tuple[A.Param, ...]:
    key = schema_key(node)
    schema = SCHEMAS[key]
    seen: dict[str, A.Param] = {}
    for p in params:
        spec = schema.get(p.name)
        if spec is None:
            _unknown_param(key, p, schema, problems)
        elif p.name in seen:
            problems.add("duplicate", f"parameter `{p.name}` given twice (first on line {seen[p.name].span.line}, "
                         f"column {seen[p.name].span.column})", p.span, "keep one of them")
        else:
            value = _coerce(spec, p, key, problems)
            if value is not None:
                seen[p.name] = dataclasses.replace(p, value=value)
    order = list(schema)
    return tuple(sorted(seen.values(), key=lambda p: order.index(p.name)))


def _unknown_param(key: str, p: A.Param, schema: dict[str, ParamSpec], problems: _Problems):
    what = _RULE_WORDS.get(key, f"`{key}`")
    takes = ", ".join(f"`{n}`" for n in schema) or "no parameters"
    hint = did_you_mean(p.name, schema) or _elsewhere(p.name, key)
    problems.add("unknown-parameter", f"{what} takes no parameter `{p.name}` (it takes {takes})", p.span,
                 hint, width=len(p.name))


def _elsewhere(name: str, key: str) -> str | None:
    owners = [k for k, s in SCHEMAS.items() if name in s and k != key]
    if not owners:
        return None
    return f"`{name}` is a parameter of " + " and ".join(_RULE_WORDS.get(k, f"`{k}`") for k in owners)


def _coerce(spec: ParamSpec, p: A.Param, key: str, problems: _Problems):
    value = p.value
    # `1e400`: once "`alpha=inf` is out of range" (a name's parameter says it takes no number)
    too_large = type(value) is float and math.isinf(value) and spec.type in (int, float)
    if spec.type is float and type(value) is int:
        value = _as_float(value)
        too_large = value is None  # more than 308 digits: OverflowError, once "a bug in slimfx"
    if too_large:
        problems.add("out-of-range", f"`{p.name}` is too large: a number is at most about 1.8e308 in size "
                     f"(`{p.name}` is {spec.expectation})", p.span,
                     f"write e.g. `{p.name}={_example(spec)}`")
        return None
    if type(value) is not spec.type:
        unquoted = _unquoted(spec, value)
        problems.add("wrong-type", f"`{p.name}` takes {_TYPE_WORDS[spec.type]}, not {_show(p.value)}",
                     p.span, f"remove the quotes: `{p.name}={unquoted}`" if unquoted else
                     f"write e.g. `{p.name}={_example(spec)}`")
        return None
    if not spec.valid(value):
        hint = did_you_mean(value, spec.choices) if spec.choices and isinstance(value, str) else None
        kind = "unknown-keyword" if hint else "out-of-range"
        wrong = "is not one of its choices" if spec.choices and isinstance(value, str) else "is out of range"
        problems.add(kind, f"`{p.name}={_show(p.value)}` {wrong}: `{p.name}` is {spec.expectation}",
                     p.span, hint or _nearest_valid(spec, p.name, value) or f"{spec.doc}")
        return None
    return value


def _nearest_valid(spec: ParamSpec, name: str, value) -> str | None:
    """`write `group=32` or `group=64`` for an integer out of range: the valid values nearest it
    either side (a hint that described the parameter left the user to work them out)."""
    if spec.type is not int or spec.choices or type(value) is not int:
        return None
    below = next((v for v in range(value - 1, value - 4097, -1) if spec.valid(v)), None)
    above = next((v for v in range(value + 1, value + 4097) if spec.valid(v)), None)
    near = [f"`{name}={v}`" for v in (below, above) if v is not None]
    return "write " + " or ".join(near) if near else None


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a name or a quoted string"}


def _show(value) -> str:
    """The value as it was written: a string in quotes where it needs them (`rank="8"` said
    "takes an integer, not 8"), a float with its point (`rank=32.0`, not 32)."""
    if isinstance(value, (bool, str)):
        return format_value(value)
    return repr(value)


def _as_float(value: int) -> float | None:
    try:
        return float(value)
    except OverflowError:
        return None


_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _unquoted(spec: ParamSpec, value) -> str | None:
    """The text inside a quoted string when, unquoted, it is a valid value (`rank="8"`), else None."""
    if not isinstance(value, str) or spec.type is str:
        return None
    text = value.strip()
    read = _read_as(spec.type, text)
    return text if read is not None and spec.valid(read) else None


def _read_as(kind: type, text: str):
    """`text` read as a bool, int or float the way the parser reads it unquoted; None if it isn't one."""
    if kind is bool:
        return {"true": True, "false": False}.get(text)
    if kind is int:
        return int(text) if _INTEGER.fullmatch(text) else None
    return float(text) if _DECIMAL.fullmatch(text) else None


def _example(spec: ParamSpec) -> str:
    if spec.example:
        return spec.example
    if spec.default is not None:
        return _show(spec.default)
    return {int: "1", float: "0.5", bool: "true", str: "name"}[spec.type] if not spec.choices else spec.choices[0]


# ---- combinations --------------------------------------------------------------------------


def _refused(name: str, params: tuple[A.Param, ...], written: tuple[A.Param, ...]) -> bool:
    """`name` was written with a value its own check refused (reported already): the checks of
    what it goes with cannot tell what was meant, and its default in its place would be a second,
    made-up problem (`sym="true" zero=float`: "this one is symmetric")."""
    return any(p.name == name for p in written) and all(p.name != name for p in params)


def _check_format_params(fmt: str, params: tuple[A.Param, ...], written: tuple[A.Param, ...],
                         problems: _Problems):
    if fmt in INT_FORMATS:
        if not _refused("sym", params, written):
            _check_zero(params, problems)
        return
    for p in params:
        if p.name in INT_ONLY_PARAMS:
            problems.add("invalid-combination", f"`{p.name}` applies to integer formats only, not `{fmt}`",
                         p.span, "remove it, or choose int8, int4 or int2")


def _check_zero(params: tuple[A.Param, ...], problems: _Problems):
    names = {p.name: p for p in params}
    zero = names.get("zero")
    sym = names["sym"].value if "sym" in names else True  # the schema's default
    if zero is not None and zero.value == "float" and sym:
        problems.add("invalid-combination", "`zero=float` (a float offset per group) needs an asymmetric format, "
                     "and this one is symmetric" + ("" if "sym" in names else " (sym=true is the default)"),
                     zero.span, "add `sym=false`" if "sym" not in names else "write `sym=false`, or remove `zero=float`")


# GPTQ's own options, and what each does: on a rule without GPTQ they changed nothing, silently.
_GPTQ_OPTIONS = {
    "refit": "fits each group's scale to the codes GPTQ chose",
    "damp": "damps GPTQ's Hessian",
    "act_order": "orders GPTQ's columns by their Hessian diagonal",
    "sequential": "calibrates GPTQ block by block",
}


def _check_gptq_only(params: tuple[A.Param, ...], written: tuple[A.Param, ...], problems: _Problems):
    """GPTQ's options (`refit`, `damp`, `act_order`, `sequential`, `true_sequential`): refused on a
    rule that does not use it (a `false` that asks for nothing is fine, `sequential` is either)."""
    if _refused("method", params, written):  # `method=1 damp=0.01`: GPTQ or not, it cannot tell
        return
    names = {p.name: p for p in params}
    gptq = names.get("method") is not None and names["method"].value == "gptq"
    for name, does in _GPTQ_OPTIONS.items():
        given = names.get(name)
        if given is not None and not gptq and (given.value is not False or name == "sequential"):
            problems.add("invalid-combination", f"`{name}` {does}, and this rule does not use GPTQ", given.span,
                         "write `method=gptq`, or remove it")
    ask = names.get("true_sequential")
    if ask is None or ask.value is not True:
        return
    if not gptq:
        problems.add("invalid-combination", "`true_sequential` orders GPTQ's calibration inside each block, and "
                     "this rule does not use GPTQ", ask.span, "write `method=gptq`, or remove it")
    elif "sequential" in names and names["sequential"].value is False:
        problems.add("invalid-combination", "`true_sequential=true` refines `sequential=true` (block by block), "
                     "and this rule says `sequential=false`", ask.span, "remove one of the two")


def _validate_choice(choice: A.FormatChoice, problems: _Problems) -> A.FormatChoice:
    params = _coerce_params(choice, choice.params, problems)
    _check_format_params(choice.format, params, choice.params, problems)
    return dataclasses.replace(choice, params=params)


def _candidate(choice: A.FormatChoice) -> tuple:
    """A candidate as the solver sees it: its format, with every parameter's default filled in."""
    given = {p.name: p.value for p in choice.params}
    group = given.get("group", DEFAULT_GROUP.get(choice.format))
    return choice.format, group, given.get("sym", True), given.get("zero", "int")


def _check_precision(rule: A.Precision, choices: tuple[A.FormatChoice, ...], problems: _Problems):
    seen = {}
    for c in choices:
        same = seen.setdefault(_candidate(c), c)
        if same is not c:  # `int4` and `int4 group=64` are one candidate: the solver saw it twice
            written = "" if same == c else f" (as `{format_choice(same)}`, the same format with its defaults)"
            problems.add("duplicate", f"format `{format_choice(c)}` is listed twice in `choose`{written}", c.span,
                         "list it once")
    budget = rule.budget
    if budget.metric == "avg_bits" and not 0 < budget.limit <= 32:
        problems.add("out-of-range", f"`avg_bits<={budget.limit}` is out of range: average bits per weight "
                     "is in (0, 32]", budget.span, "e.g. `budget avg_bits<=4.5`")
    if budget.metric == "bytes" and not budget.limit_value >= 1:
        problems.add("out-of-range", "a byte budget must be at least 1 byte", budget.span, "e.g. `budget bytes<=64MiB`")
    elif budget.metric == "bytes" and not _finite(budget.limit_value):
        # `1e400` reads as inf, which `fmt` would print as `inf`: no number, so no policy; an
        # integer past a float's range could not be compared with sizes (OverflowError)
        problems.add("out-of-range", "a byte budget must be a finite size, and this one is too large", budget.span,
                     "e.g. `budget bytes<=64GiB`")
    if budget.metric == "avg_bits" and budget.limit < min(FORMAT_BITS[c.format] for c in choices):
        smallest = min(FORMAT_BITS[c.format] for c in choices)
        problems.add("out-of-range", f"`avg_bits<={budget.limit}` is below the smallest format offered "
                     f"({smallest} bits)", budget.span, "raise the budget or offer a smaller format")
    if rule.metric not in METRICS:
        # `mse` is too short for did_you_mean's cutoff, but plainly means `output_mse`
        near = [m for m in METRICS if rule.metric.lower() in m or m in rule.metric.lower()]
        hint = did_you_mean(rule.metric, METRICS) or (
            "did you mean " + " or ".join(f"`{m}`" for m in near) + "?" if near else None)
        problems.add("unknown-keyword", f"unknown sensitivity metric `{rule.metric}` (known: "
                     + ", ".join(METRICS) + ")", _metric_span(rule, problems.source), hint)


def _finite(number) -> bool:
    value = _as_float(number) if isinstance(number, int) else number
    return value is not None and math.isfinite(value)


# `… budget avg_bits<=6 by output_mse`: a rule is on one line, and the metric follows the budget.
_BY_METRIC = re.compile(r"[\t \f]*by[\t \f]+([A-Za-z_][A-Za-z0-9_]*)")


def _metric_span(rule: A.Precision, source: str) -> A.Span:
    """Where the metric is written; the AST keeps no span of it, so it is found after the budget's
    (the whole rule's span where that fails, as for a Spec built in code)."""
    end = rule.budget.span
    lines = source_lines(source)
    if not 0 < end.end_line <= len(lines):
        return rule.span
    m = _BY_METRIC.match(lines[end.end_line - 1], end.end_column - 1)
    if m is None or m.group(1) != rule.metric:
        return rule.span
    return A.Span(end.end_line, m.start(1) + 1, end.end_line, m.end(1) + 1)


def _check_adapt(params: tuple[A.Param, ...], problems: _Problems):
    names = {p.name: p for p in params}
    if "from" in names and "init" in names:
        problems.add("invalid-combination", "`init` sets up a fresh adapter, and `from=` loads a trained one",
                     names["init"].span, "remove `init`")
    if "init" in names and names["init"].value == "error" and "merge" in names and names["merge"].value is True:
        problems.add("invalid-combination", "`init=error` starts the adapter from the quantization error of the "
                     "packed weights, and `merge=true` would fold it into them, which packed weights cannot take",
                     names["merge"].span, "write `merge=false` (the default): the adapter stays beside the "
                     "quantized weight, trainable")


def _check_auto(auto: A.Auto, written: tuple[A.Param, ...], problems: _Problems):
    names = {p.name: p for p in auto.params}
    score_dropped = _refused("score", auto.params, written)
    if {"ratio", "count"} <= set(names):
        problems.add("invalid-combination", "give `ratio` or `count`, not both", auto.span,
                     "keep one: `ratio` is a fraction of the blocks, `count` a number of them")
    if "max_run" in names and auto.get("score") != "angular" and not score_dropped:
        problems.add("invalid-combination", "`max_run` applies to `score=angular` only, and this auto(…) "
                     f"ranks blocks by `score={auto.get('score')}`", names["max_run"].span,
                     "write `score=angular`, or remove `max_run`")


def _check_heal(rule: A.Heal, params: tuple[A.Param, ...], problems: _Problems):
    names = {p.name: p for p in params}
    if "method" not in names:
        if not any(p.name == "method" for p in rule.params):  # a bad `method=` is reported already
            problems.add("missing-value", "`heal` needs a `method`", rule.span,
                         "write `heal method=linear` (training-free, seconds) or `heal method=lora`",
                         width=len("heal"))
        return
    method = names["method"].value
    for p in params:
        owner = HEAL_METHOD_PARAMS.get(p.name, method)
        if owner != method:
            problems.add("invalid-combination", f"`{p.name}` applies to `heal method={owner}` only, "
                         f"not `method={method}`", p.span, f"remove it, or write `method={owner}`")


# ---- selectors -----------------------------------------------------------------------------


def _check_selector(selector: A.Selector, problems: _Problems):
    for index in _indices(selector.path):
        if isinstance(index, A.Slice) and index.step == 0:
            problems.add("out-of-range", "a slice step cannot be zero", selector.span, "e.g. `blocks[::2]`")


def _indices(path: A.Path):
    for seg in path.segments:
        if isinstance(seg, A.Name) and seg.index is not None:
            yield seg.index
        elif isinstance(seg, A.Alternatives):
            for option in seg.options:
                yield from _indices(option)
