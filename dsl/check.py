"""Static checks across rules: orders that cannot work, rules that would do nothing, duplicates.

These need only the policy text. Checks that need the model (two selectors that overlap on the
same module) happen when rules are bound to the graph; this module catches what it can earlier,
with a message that says what to write instead.
"""
from __future__ import annotations

from . import ast as A
from .errors import Diagnostic, SpecError
from .printer import format_selector

__all__ = ["check_spec", "check_policy"]

_STRUCTURAL = (A.Collapse, A.Drop)
_WEIGHT_CHANGING = (A.Adapt, A.Quantize, A.Precision, A.Heal)
_PRECISION_RULES = (A.Quantize, A.Precision)


def check_spec(spec: A.Spec) -> None:
    """Raise one SpecError listing every problem in the file."""
    problems: list[Diagnostic] = []
    seen: dict[str, A.Policy] = {}
    for policy in spec.policies:
        if policy.name in seen:
            first = seen[policy.name].span
            problems.append(_at(policy.span, "duplicate", f"a second policy named `{policy.name}` "
                                f"(the first is on line {first.line})", "give each policy its own name",
                                width=len("policy")))
        seen.setdefault(policy.name, policy)
        problems += check_policy(policy)
    if problems:
        raise SpecError(problems, spec.source, spec.filename)


def check_policy(policy: A.Policy) -> list[Diagnostic]:
    problems: list[Diagnostic] = []
    for i, rule in enumerate(policy.rules):
        if isinstance(rule, A.Heal) and not any(isinstance(r, _STRUCTURAL) for r in policy.rules[:i]):
            problems.append(_heal_first(rule))
        if isinstance(rule, A.Unpad):
            problems += _unpad_problems(rule, policy.rules[:i])
        if isinstance(rule, A.Adapt) and rule.get("init") == "error" \
                and not any(isinstance(r, _PRECISION_RULES) for r in policy.rules[:i]):
            problems.append(_error_init_first(rule))
        for j, earlier in enumerate(policy.rules[:i]):
            # a `drop`/`collapse` at or after `earlier` renumbers the blocks `rule` names
            problem = _pair_problem(earlier, rule, any(isinstance(r, _STRUCTURAL) for r in policy.rules[j:i]))
            if problem:
                problems.append(problem)
    return problems


def _heal_first(heal: A.Heal) -> Diagnostic:
    return _at(heal.span, "illegal-order", "`heal` repairs what a `collapse` or `drop` before it removed, and "
               f"nothing before line {heal.span.line} removes blocks",
               "put `heal` after a `collapse` or `drop` rule, or remove it", width=len("heal"))


def _error_init_first(adapt: A.Adapt) -> Diagnostic:
    return _at(adapt.span, "illegal-order", "`adapt … init=error` starts each adapter from the error a `quantize` "
               f"left in its weight, and nothing before line {adapt.span.line} quantizes",
               "put a `quantize` (or `precision`) rule on the same linears above this one, or use "
               "`init=kaiming`", width=len("adapt"))


def _unpad_problems(unpad: A.Unpad, earlier: tuple[A.Rule, ...]) -> list[Diagnostic]:
    """`tokens unpad` once per policy, above every `tokens after` rule: pruning and merging then
    rank real tokens only."""
    first = next((r for r in earlier if isinstance(r, A.Unpad)), None)
    if first is not None:
        return [_at(unpad.span, "duplicate", f"a second `tokens unpad` rule (the first is on line {first.span.line})",
                    "remove this one: a batch is unpadded once", width=len("tokens unpad"))]
    after = next((r for r in earlier if isinstance(r, A.Tokens)), None)
    if after is not None:
        line = after.span.line
        return [_at(unpad.span, "illegal-order", f"`tokens unpad` after `tokens after` (line {line}): tokens are "
                    "pruned or merged with the padding still in the batch",
                    f"move `tokens unpad` above line {line}, the first `tokens after` rule",
                    width=len("tokens unpad"))]
    return []


def _pair_problem(earlier: A.Rule, later: A.Rule, renumbered: bool = False) -> Diagnostic | None:
    """What is wrong with `later` given that `earlier` comes before it, if anything. `renumbered`:
    blocks were removed in between, so the same selector text may name other blocks."""
    line = earlier.span.line
    if isinstance(earlier, A.Tokens) and isinstance(later, A.Tokens) \
            and bool(earlier.get("restore")) != bool(later.get("restore")):
        said = str(bool(later.get("restore"))).lower()
        return _at(later.span, "invalid-combination", f"`restore={said}` here and `restore="
                   f"{str(bool(earlier.get('restore'))).lower()}` on line {line}: the model's outputs are either "
                   "the original length or the shorter one", "say the same `restore=` on every `tokens after` rule",
                   width=len("tokens"))
    if isinstance(later, _STRUCTURAL) and later.auto is not None and isinstance(earlier, A.Tokens):
        return _at(later.span, "illegal-order", f"`{later.kind} … auto(…)` after `tokens after` (line {line}): the "
                   "search compares each block's residual stream on every token, and the token rule leaves fewer "
                   "tokens after its block", f"move this `{later.kind}` rule above line {line} (the token rule's "
                   "blocks are then counted among the blocks that remain)")
    if isinstance(later, _STRUCTURAL) and isinstance(earlier, _WEIGHT_CHANGING):
        why = ("`heal` repairs the blocks removed before it, so blocks are merged or removed first"
               if isinstance(earlier, A.Heal) else
               "blocks are merged or removed on full-precision weights without adapters")
        return _at(later.span, "illegal-order", f"`{later.kind}` after `{earlier.kind}` (line {line}): {why}",
                   f"move this `{later.kind}` rule above line {line}")
    if earlier.selector is None or later.selector is None:  # the checks below compare selectors
        return None
    same = format_selector(earlier.selector) == format_selector(later.selector)
    sel = format_selector(later.selector)
    if not same or (renumbered and _may_name_blocks(sel)):  # bind compares what they select then
        return None
    if isinstance(later, A.Adapt) and later.get("merge") and isinstance(earlier, _PRECISION_RULES):
        return _at(later.span, "illegal-order", f"`adapt … merge=true` on `{sel}` after `{earlier.kind}` "
                   f"(line {line}): an adapter cannot be merged into already-quantized weights",
                   f"put this `adapt` above line {line} to merge before quantizing, or write "
                   "`merge=false` to keep the adapter in full precision (QLoRA style)")
    if isinstance(later, _PRECISION_RULES) and isinstance(earlier, _PRECISION_RULES):
        return _at(later.span, "duplicate", f"`{sel}` is given a precision twice: here and by `{earlier.kind}` "
                   f"on line {line}", "keep one of the two rules")
    # Not two removals: the later one's `blocks[0]` is the first block left after the earlier one.
    # An adapter merged into the weights (`merge=true`) leaves the linear free for another one:
    # what the model-level check advises for two adapters on one linear.
    merged_first = isinstance(earlier, A.Adapt) and bool(earlier.get("merge"))
    if type(later) is type(earlier) and isinstance(later, (A.Adapt, A.Tokens, A.Keep)) and not merged_first:
        return _at(later.span, "duplicate", f"a second `{later.kind}` rule on `{sel}` (the first is on line {line})",
                   "merge the two rules into one")
    # What is left: exactly one of the two is a `keep`. It protects weights; a token step has none.
    if isinstance(earlier, A.Keep) is isinstance(later, A.Keep) or isinstance(earlier, A.Tokens) \
            or isinstance(later, A.Tokens):
        return None
    keep, other = (earlier, later) if isinstance(earlier, A.Keep) else (later, earlier)
    return _at(later.span, "invalid-combination",
               f"`keep {sel}` (line {keep.span.line}) protects exactly what `{other.kind}` "
               f"(line {other.span.line}) selects, so that rule would do nothing",
               "remove one of the two rules, or narrow one selector")


def _may_name_blocks(selector_text: str) -> bool:
    """`blocks[0].mlp`, `{blocks[1], head}`, `**`: what they select moves when blocks are removed."""
    return "blocks" in selector_text or selector_text.startswith("*")


def _at(span: A.Span, kind: str, message: str, hint: str | None = None, width: int | None = None) -> Diagnostic:
    w = width if width is not None else max(1, span.end_column - span.column if span.end_line == span.line else 1)
    return Diagnostic(kind, message, span.line, span.column, w, hint)
