"""Static checks across rules: orders that cannot work, rules that would do nothing, duplicates.

These need only the policy text. Checks that need the model (two selectors that overlap on the
same module) happen when rules are bound to the graph; this module catches what it can earlier,
with a message that says what to write instead.
"""
from __future__ import annotations

import bisect

from . import ast as A
from .errors import Diagnostic, SpecError
from .printer import format_rule, format_selector

__all__ = ["check_spec", "check_policy"]

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
    rules = policy.rules
    problems: list[Diagnostic] = []
    last_removal = _last_removal_before(rules)
    texts = [format_selector(r.selector) if r.selector is not None else None for r in rules]
    earlier_by = _EarlierRules()
    unhealed, token_step = False, None  # a removal since the last heal; a token step since it
    for i, rule in enumerate(rules):
        if isinstance(rule, A.Heal) and last_removal[i] < 0:
            problems.append(_heal_first(rule))
        if isinstance(rule, A.Heal) and token_step is not None:
            problems.append(_token_step_before_heal(rule, token_step))
        if isinstance(rule, A.Heal):
            unhealed, token_step = False, None
        unhealed = unhealed or isinstance(rule, A.BLOCK_RULES)
        if unhealed and token_step is None and isinstance(rule, A.Tokens):
            token_step = rule
        if isinstance(rule, A.Unpad):
            problems += _unpad_problems(rule, rules[:i])
        if isinstance(rule, A.Adapt) and rule.get("init") == "error" and not earlier_by.precision:
            problems.append(_error_init_first(rule))
        for j in earlier_by.may_clash_with(rule, texts[i], last_removal[i]):
            # a `drop`/`collapse` at or after `earlier` renumbers the blocks `rule` names
            problem = _pair_problem(rules[j], rule, last_removal[i] >= j, texts[j], texts[i])
            if problem:  # one per rule: 1,000 copies of a rule made 499,500 (a 78 MB message, 33 s)
                problems.append(problem)
                break
        earlier_by.add(i, rule, texts[i], format_rule(rule))
    return problems


def _last_removal_before(rules: tuple[A.Rule, ...]) -> list[int]:
    """For each rule index, the index of the last `collapse`/`drop` above it (-1 for none): a
    removal at or after rule j renumbers what rule i names exactly when this is >= j."""
    out, last = [], -1
    for i, rule in enumerate(rules):
        out.append(last)
        if isinstance(rule, A.BLOCK_RULES):
            last = i
    return out


class _EarlierRules:
    """The rules seen so far, indexed by what can make them clash with a later one, so that a
    policy of many rules on distinct selectors compares no pairs (comparing every pair made
    `slimfx check` of 1000 rules take half a minute)."""

    def __init__(self):
        # selector text -> rule as written -> its indexes: copies of one rule on one selector
        # clash with a later rule alike, so each is compared once (6,000 copies of a rule that
        # may repeat, compared pair by pair, took 47 s)
        self.by_selector: dict[str, dict[str, list[int]]] = {}
        self.tokens_by_restore: dict[bool, list[int]] = {True: [], False: []}
        self.weight_changing: list[int] = []
        self.precision = False  # a `quantize` or `precision` rule seen

    def add(self, i: int, rule: A.Rule, text: str | None, written: str):
        if text is not None:
            self.by_selector.setdefault(text, {}).setdefault(written, []).append(i)
        if isinstance(rule, A.Tokens):
            self.tokens_by_restore[bool(rule.get("restore"))].append(i)
        if isinstance(rule, _WEIGHT_CHANGING):
            self.weight_changing.append(i)
        self.precision = self.precision or isinstance(rule, _PRECISION_RULES)

    def may_clash_with(self, rule: A.Rule, text: str | None, last_removal: int) -> list[int]:
        """The earlier indexes, ascending, for which _pair_problem can find something: the
        first three of its checks look at rule kinds, the rest need equal selector text. Of the
        copies of one rule, the first above the last removal and the first below it (whether
        a removal renumbered the blocks between is all that tells them apart)."""
        found = set()
        for indexes in (self.by_selector.get(text, {}).values() if text is not None else ()):
            found.add(indexes[0])
            below = bisect.bisect_right(indexes, last_removal)
            if below < len(indexes):
                found.add(indexes[below])
        if isinstance(rule, A.Tokens):  # a `restore=` that differs
            found.update(self.tokens_by_restore[not bool(rule.get("restore"))])
        if isinstance(rule, A.BLOCK_RULES):
            found.update(self.weight_changing)
            if rule.auto is not None:
                found.update(self.tokens_by_restore[True] + self.tokens_by_restore[False])
        return sorted(found)


def _heal_first(heal: A.Heal) -> Diagnostic:
    return _at(heal.span, "illegal-order", "`heal` repairs what a `collapse` or `drop` before it removed, and "
               f"nothing before line {heal.span.line} removes blocks",
               "put `heal` after a `collapse` or `drop` rule, or remove it", width=len("heal"))


def _token_step_before_heal(heal: A.Heal, step: A.Tokens) -> Diagnostic:
    """What a removal recorded for its heal is rows of the tokens it saw; a merge or prune after
    it leaves fewer (a raw size mismatch in the fit)."""
    return _at(heal.span, "illegal-order", f"`heal` fits its maps on the tokens the `collapse`/`drop` rules above "
               f"it saw, and `tokens after … {step.action}` on line {step.span.line} changes them in between",
               f"move line {step.span.line} below this `heal`", width=len("heal"))


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


def _pair_problem(earlier: A.Rule, later: A.Rule, renumbered: bool, earlier_text: str | None,
                  later_text: str | None) -> Diagnostic | None:
    """What is wrong with `later` given that `earlier` comes before it, if anything. `renumbered`:
    blocks were removed in between, so the same selector text may name other blocks. The texts
    are the two selectors as format_selector writes them (None for none)."""
    line = earlier.span.line
    if isinstance(earlier, A.Tokens) and isinstance(later, A.Tokens) \
            and bool(earlier.get("restore")) != bool(later.get("restore")):
        said = str(bool(later.get("restore"))).lower()
        return _at(later.span, "invalid-combination", f"`restore={said}` here and `restore="
                   f"{str(bool(earlier.get('restore'))).lower()}` on line {line}: the model's outputs are either "
                   "the original length or the shorter one", "say the same `restore=` on every `tokens after` rule",
                   width=len("tokens"))
    if isinstance(later, A.BLOCK_RULES) and later.auto is not None and isinstance(earlier, A.Tokens):
        return _at(later.span, "illegal-order", f"`{later.kind} … auto(…)` after `tokens after` (line {line}): the "
                   "search compares each block's residual stream on every token, and the token rule leaves fewer "
                   "tokens after its block", f"move this `{later.kind}` rule above line {line} (the token rule's "
                   "blocks are then counted among the blocks that remain)")
    if isinstance(later, A.BLOCK_RULES) and isinstance(earlier, _WEIGHT_CHANGING):
        why = ("`heal` repairs the blocks removed before it, so blocks are merged or removed first"
               if isinstance(earlier, A.Heal) else
               "blocks are merged or removed on full-precision weights without adapters")
        return _at(later.span, "illegal-order", f"`{later.kind}` after `{earlier.kind}` (line {line}): {why}",
                   f"move this `{later.kind}` rule above line {line}")
    if earlier_text is None or later_text is None:  # the checks below compare selectors
        return None
    sel = later_text
    if earlier_text != sel or (renumbered and _may_be_renumbered(sel)):  # bind compares what they select then
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


def _may_be_renumbered(selector_text: str) -> bool:
    """`blocks[0].mlp`, `{blocks[1], head}`, `**`, and raw paths such as `model.layers[0]` or
    `transformer.h.*`: what they select moves when blocks are removed (bind renumbers a module
    list's raw indexes too, so any index or wildcard may name other modules after a removal)."""
    return "blocks" in selector_text or "[" in selector_text or "*" in selector_text


def _at(span: A.Span, kind: str, message: str, hint: str | None = None, width: int | None = None) -> Diagnostic:
    w = width if width is not None else max(1, span.end_column - span.column if span.end_line == span.line else 1)
    return Diagnostic(kind, message, span.line, span.column, w, hint)
