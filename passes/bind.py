"""Bind: Policy + ModelGraph -> Plan. Every rule resolved to concrete targets; nothing touched.

The plan is what `slimfx plan` prints and what the pipeline runs. Binding is where rule-level
checks that need the model happen: a selector that matches nothing, `tokens after` something that
is not one block, `keep` protecting what a `drop` removes, one linear quantized twice.

Rules after a `collapse`/`drop` bind to the model as it is after it (blocks_view.py): blocks
renumbered, the removed ones gone. After an `auto(…)` one, which blocks go is decided at compile
time, so the rules after it are bound provisionally here (`deferred_by` names the auto rule's
line) and bound again by the pipeline once the search has run (`rebind`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..dsl import ast as A
from ..dsl.errors import Diagnostic, SpecError
from ..dsl.printer import format_rule
from ..runtime.adapters import adapters_of
from ..runtime.peft_format import adapter_directory
from ..runtime.losses import lm_loss_problem
from .block_reads import removal_problem, step_left_last, token_step_in
from .block_rules import auto_count, collapse_range_problem, full_precision_problem, merge_problem
from .blocks_view import without_blocks
from .causal import merge_refusal
from .cut_gaps import gap_edges, heal_neighbours
from .heal_rules import heal_problem
from .token_attention import token_attention_problem, unpad_mask_problem
from .token_step_checks import steps_left_last, token_step_order
from .estimate import Estimate, estimate, leaves_as_is, stored_after
from .graph import Block, ModelGraph, Target
from .graph_sizes import graph_bytes, graph_params, read_directly_note
from .rewrite import TIED_NOTE, has_weight, shared_outside
from .peft_in import check as check_adapter_directory
from .select import resolve
from .token_history import no_gradients_problem, tokens_again_refusal

__all__ = ["BoundRule", "Plan", "bind", "rebind"]

_LINEAR_RULES = (A.Adapt, A.Quantize, A.Precision)
_STREAM_RULES = (A.Collapse, A.Drop, A.Heal, A.Tokens, A.Unpad)  # they read or rewire Block.input/output


@dataclass(frozen=True)
class BoundRule:
    """A rule with what it acts on: targets (linears) or blocks, minus what `keep` protects."""

    rule: A.Rule
    targets: tuple[Target, ...] = ()
    blocks: tuple[Block, ...] = ()
    protected: tuple[str, ...] = ()  # paths `keep` removed from this rule (block rules: blocks it must not remove)
    estimate: Estimate = field(default_factory=Estimate)
    warnings: tuple[str, ...] = ()
    deferred_by: int | None = None  # line of an earlier auto rule: this binding is redone at compile time

    @property
    def text(self) -> str:
        return format_rule(self.rule)

    @property
    def line(self) -> int:
        return self.rule.span.line

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.path for t in self.targets) or tuple(b.path for b in self.blocks)


@dataclass(frozen=True)
class Plan:
    policy: A.Policy | None
    model_class: str
    rules: tuple[BoundRule, ...] = ()
    bytes_total: int = 0
    params_total: int = 0
    protected: frozenset[str] = frozenset()  # module paths `keep` protects (stable across renumbering)


def bind(graph: ModelGraph, policy: A.Policy | None, *, source: str = "", filename: str = "<policy>") -> Plan:
    """Resolve every rule of `policy` on `graph`. All problems are raised together."""
    totals = dict(bytes_total=graph_bytes(graph), params_total=graph_params(graph))
    if policy is None:
        return Plan(None, graph.model_class, **totals)
    binder = _Binder(graph, source, filename)
    bound = binder.bind_all(policy.rules)
    return Plan(policy, graph.model_class, bound, protected=frozenset(binder.protected), **totals)


def rebind(graph: ModelGraph, plan: Plan, start: int, *, source: str = "", filename: str = "<policy>") -> Plan:
    """The plan with its rules from index `start` on bound again to `graph` as it is now (after an
    auto collapse/drop chose its blocks); `keep` protects the same modules as before."""
    binder = _Binder(graph, source, filename, rebinding=True)
    bound = binder.bind_all(plan.policy.rules[start:], protected=set(plan.protected))
    # and what the `keep` rules bound now protect, for the rebinding after a later auto rule
    return replace(plan, rules=plan.rules[:start] + bound, protected=frozenset(binder.protected))


# A rule after an auto rule whose selection `keep` protects on plan's stand-in for the search's choice.
_MAYBE_KEPT = ("`keep` protects what this rule selects on the model as it is before the search runs; compile "
               "refuses the rule if the blocks the search leaves make it so")


class _Binder:
    def __init__(self, graph: ModelGraph, source: str, filename: str, rebinding: bool = False):
        self.graph, self.source, self.filename = graph, source, filename
        # bound again after an auto rule ran: `graph` is already cut there, and the cuts the rules
        # above made (the search's among them) are not gaps of it
        self.rebinding = rebinding
        self.chain_break = getattr(graph, "chain_break", None)  # of the whole model, before any view
        self.captured = graph  # the whole graph, where self.graph is a view after removed blocks
        self.deferred = False  # the rule being bound follows an auto rule (its view is a stand-in)
        self.stored: dict[str, int] = {}  # target path -> bytes, as the quantize/precision rules bound so far leave it
        self.problems: list[Diagnostic] = []
        self.protected: set[str] = set()
        # What each `keep` selector found (by id of the rule) when `_protected` resolved it, so that
        # `_bind_keep` does not resolve it again and report its selector problems a second time.
        self.keep_found: dict[int, list[Target | Block]] = {}
        # Linears with an unmerged adapter so far (an earlier compile's, then the rules' bound so far):
        # a LoRA heal leaves them out, so its estimate does too.
        self.adapted: set[str] = set(adapters_of(graph.module))
        # Linears whose weight is no float tensor of their own: an earlier compile's quantized ones,
        # and those the quantize/precision rules bound so far rewrite. No fold or merge into them.
        self.earlier: set[str] = {t.path for t in graph.targets.values() if t.kind == "linear" and not has_weight(t)}
        self.reformatted: set[str] = set()
        self.mapped = False  # a `heal method=linear` (no fold) bound so far put a map at every cut
        # The line of the first token rule bound so far: its ops have no gradients, so no rule after
        # it trains or takes gradients through the model (autograd's raw error at compile)
        self.token_line: int | None = None

    def bind_all(self, rules: tuple[A.Rule, ...], protected: set[str] | None = None) -> tuple[BoundRule, ...]:
        """`protected`: what the `keep` rules before `rules` protect (rebind: resolved before)."""
        views = self._views(rules, set(protected or ()))
        fixed, deferred = self._protected(rules, views)
        # A `keep` after an auto rule names blocks only the search decides: it protects the rules
        # after that rule (bound again once it ran), not the search itself, which it steered
        # while resolved on the stand-in model (and protected other modules than it listed).
        self.protected = set(protected or ()) | fixed
        bound = []
        for rule, (view, deferred_by) in zip(rules, views):
            self.graph, self.deferred = view, deferred_by is not None
            b = self._bind(rule, self.protected | deferred if deferred_by is not None else self.protected)
            if deferred_by is not None:
                b = replace(b, deferred_by=deferred_by, warnings=b.warnings + (
                    f"decided at compile time: the auto rule on line {deferred_by} chooses which blocks "
                    "go first, and blocks are renumbered after it",))
            if isinstance(rule, A.Adapt) and not rule.get("merge"):
                self.adapted |= {t.path for t in b.targets}
            bound.append(b)
        self._check_overlaps(bound)
        reported = {d.line for d in self.problems}
        for problem in steps_left_last(rules, bound, views, self.final_view, token_step_in(self.captured), reported):
            self._error(*problem)
        if self.problems:
            raise SpecError(self.problems, self.source, self.filename)
        return tuple(bound)

    def _views(self, rules, kept: set[str]) -> list[tuple[object, int | None]]:
        """Per rule: the model as it is when the rule runs (blocks an explicit collapse/drop before
        it removed are gone), and the line of an earlier auto rule if there is one."""
        view, deferred_by, out = self.graph, None, []
        kept = set(kept)  # what the `keep` rules so far protect (rebind: those above): no candidate of an auto drop
        for rule in rules:
            out.append((view, deferred_by))
            if isinstance(rule, A.Keep):
                kept |= {p for f in self._quiet_resolve(view, rule.selector) for p in _paths_of(f, view)}
            if not isinstance(rule, A.BLOCK_RULES):
                continue
            if rule.auto is not None:
                deferred_by = deferred_by or rule.span.line
                if isinstance(rule, A.Collapse):  # its count is an upper bound: the search may keep fewer
                    continue
            blocks = [f for f in self._quiet_resolve(view, rule.selector) if isinstance(f, Block)]
            if rule.auto is not None:
                # An auto drop removes exactly its count, which blocks decided at compile: later rules
                # bind to a stand-in with that many fewer (the last selected that no `keep` protects),
                # so that an index past the end is an error in `plan` too, not only at compile.
                count = rule.auto.get("count") or round(rule.auto.get("ratio") * len(view.blocks))  # as auto_count
                blocks = [b for b in blocks if not _paths_of(b, view) & kept]
                blocks = blocks[len(blocks) - count:] if 0 < count <= len(blocks) else []
            gone = blocks[1:] if isinstance(rule, A.Collapse) else blocks
            if len(gone) < len(view.blocks):
                view = without_blocks(view, {b.path for b in gone})
        self.final_view = view
        return out

    def _quiet_resolve(self, view, selector: A.Selector) -> list[Target | Block]:
        """What the selector finds on `view`; nothing where it fails (reported when its rule is bound)."""
        try:
            return resolve(view, selector, source=self.source, filename=self.filename)
        except SpecError:
            return []

    def _resolve(self, selector: A.Selector) -> list[Target | Block]:
        try:
            return resolve(self.graph, selector, source=self.source, filename=self.filename)
        except SpecError as e:
            self.problems += e.diagnostics
            return []

    def _protected(self, rules, views) -> tuple[set[str], set[str]]:
        """What the `keep` rules protect: (those bound on the model as it is, those after an auto
        rule, resolved on a stand-in until compile binds them again)."""
        fixed: set[str] = set()
        deferred: set[str] = set()
        for rule, (view, deferred_by) in zip(rules, views):
            if isinstance(rule, A.Keep):
                self.graph = view
                self.keep_found[id(rule)] = self._resolve(rule.selector)
                for found in self.keep_found[id(rule)]:
                    (fixed if deferred_by is None else deferred).update(_paths_of(found, self.graph))
        return fixed, deferred

    def _bind(self, rule: A.Rule, protected: set[str]) -> BoundRule:
        if self.chain_break is not None and isinstance(rule, _STREAM_RULES):
            word = "tokens" if isinstance(rule, A.Unpad) else rule.kind
            self._error(A.Span(rule.span.line, rule.span.column, rule.span.line, rule.span.column + len(word)),
                        "unsupported", f"`{word}` rewires the residual stream that passes from block to block, "
                        f"and {self.graph.model_class}'s blocks do not pass it on: {self.chain_break} (the residual "
                        "add is outside the blocks)", "rules on linears (quantize, adapt, precision) work on this "
                        "model; for this one, add the residual inside each block's forward")
        again = tokens_again_refusal(self.captured, format_rule(rule)) if isinstance(rule, (A.Tokens, A.Unpad)) else None
        if again:
            self._error(rule.span, "unsupported", *again)
        if isinstance(rule, (A.Tokens, A.Unpad)) and self.token_line is None:
            self.token_line = rule.span.line
        if isinstance(rule, A.Keep):
            return self._bind_keep(rule)
        if isinstance(rule, (A.Heal, A.Unpad)):  # no selector: they act on the whole model
            kept = tuple(sorted(protected)) if isinstance(rule, A.Heal) else ()  # heal leaves these alone
            cuts = None if self.deferred else len(gap_edges(self.captured, self.graph))
            adapted = ()  # the linears a LoRA heal keeps adapters on (merged, they add nothing)
            if isinstance(rule, A.Heal):
                self._check_heal(rule, cuts, protected)
            if isinstance(rule, A.Heal) and rule.get("method") == "lora" and not rule.get("merge") and cuts:
                adapted = tuple(t for t in heal_neighbours(self.captured, self.graph, rule.get("reach"))
                                if t.path not in protected and t.path not in self.adapted)
                self.adapted |= {t.path for t in adapted}
            if isinstance(rule, A.Heal) and rule.get("method") == "linear" and not rule.get("fold"):
                self.mapped = True
            elif isinstance(rule, A.Unpad) and (problem := unpad_mask_problem(self.captured)) is not None:
                self._error(rule.span, "unsupported", *problem)
            return BoundRule(rule, protected=kept, estimate=estimate(rule, adapted, (), self.graph, cuts=cuts))
        found = self._resolve(rule.selector)
        if isinstance(rule, A.BLOCK_RULES):
            return self._bind_blocks(rule, found, protected)
        if isinstance(rule, A.Tokens):
            return self._bind_tokens(rule, found)
        return self._bind_linears(rule, found, protected)

    def _check_heal(self, rule: A.Heal, cuts: int | None, protected: set[str]) -> None:
        """What the model and the rules above decide before any weight changes: compile refused
        these only when the heal ran, after every rule above it (a LoRA heal's merge only after
        its training)."""
        lora = rule.get("method") == "lora"
        if lora and (problem := no_gradients_problem(self.captured, self.token_line,
                                                     "`heal method=lora` trains its adapters")):
            self._error(rule.span, "unsupported", *problem)
            return
        problem = heal_problem(rule, self.captured, self.graph if cuts else None, protected,
                               adapted=self.adapted, reformatted=self.reformatted, earlier=self.earlier,
                               mapped=self.mapped, all_cuts=not self.rebinding)
        if problem is not None:
            self._error(rule.span, *problem)

    def _bind_keep(self, rule: A.Keep) -> BoundRule:
        # Resolved already when `_protected` ran in this binder (not in `rebind`, which is given them).
        found = self.keep_found[id(rule)] if id(rule) in self.keep_found else self._resolve(rule.selector)
        targets = tuple(t for f in found for t in _targets_of(f, self.graph))
        return BoundRule(rule, targets=targets, estimate=estimate(rule, targets, (), self.graph))

    def _bind_blocks(self, rule, found, protected: set[str]) -> BoundRule:
        blocks = tuple(f for f in found if isinstance(f, Block))
        n = len(self.graph.blocks)
        other = next((f for f in found if not isinstance(f, Block)), None)  # never dropped silently
        if other is not None:
            self._error(rule.selector.span, "selector", f"`{rule.kind}` acts on blocks, and `"
                        f"{_sel(rule)}` selects {other.path} (a {other.kind})",
                        "select blocks, e.g. `blocks[20:28]` or `blocks` with auto(...)")
        if isinstance(rule, A.Collapse) and rule.auto is None and 0 < len(blocks) < 2:
            self._error(rule.selector.span, "invalid-combination", "an explicit `collapse` needs at least "
                        "two blocks to merge", "e.g. `collapse blocks[24:28]`, or `collapse blocks auto(...)`")
        unmergeable = full_precision_problem(self.graph, blocks) if isinstance(rule, A.Collapse) else None
        if unmergeable is not None:  # first: it also makes the blocks unlike each other
            self._error(rule.selector.span, "illegal-order", *unmergeable)
        elif isinstance(rule, A.Collapse) and rule.auto is None and blocks:
            # The same check the collapse pass makes at compile, so that `plan` refuses what compile would.
            problem = collapse_range_problem(blocks)
            if problem is not None:
                self._error(rule.selector.span, "selector", *problem)
            elif (unlike := merge_problem(self.graph, blocks[0], list(blocks[1:]))) is not None:
                self._error(rule.selector.span, "unsupported", *unlike)
        removed = blocks[1:] if isinstance(rule, A.Collapse) else blocks  # LaCo merges into the first
        problem = removal_problem(list(removed)) if rule.auto is None and removed else None
        if problem is None and rule.auto is None and removed:  # a step compiled in earlier (compile(cm, …))
            problem = step_left_last(self.graph.blocks, removed)
        if problem is not None:
            self._error(rule.selector.span, "unsupported", *problem)
        if rule.auto is None and blocks and len(blocks) == n:
            what = "merges every block of the model into one" if isinstance(rule, A.Collapse) else \
                f"removes all {n} blocks of the model" if n > 1 else "removes the only block the model has left"
            smallest = 2 if isinstance(rule, A.Drop) else 3  # a collapse of fewer than 2 blocks is refused
            self._error(rule.selector.span, "out-of-range", f"`{rule.kind} {_sel(rule)}` {what}",
                        f"select fewer blocks, e.g. `blocks[0:{n - 1}]`" if n >= smallest else
                        f"a model of {n} block{'s' * (n != 1)} has no `{rule.kind}` that leaves "
                        + ("one" if isinstance(rule, A.Drop) else "more than one"))
        hit = sorted(p for b in blocks for p in _paths_of(b, self.graph) if p in protected)
        warnings = ()
        if hit and rule.auto is None and self.deferred:
            warnings = (_MAYBE_KEPT,)
        elif hit and rule.auto is None:
            self._error(rule.span, "invalid-combination", f"`keep` protects {hit[0]}, which this `{rule.kind}` "
                        "removes", "narrow the `keep` or the block range")
        kept = tuple(b.path for b in blocks if _paths_of(b, self.graph) & protected)
        if rule.auto is not None and blocks:
            self._check_auto_count(rule, [b.index for b in blocks if b.path not in kept], n)
        if hit and rule.auto is not None:
            warnings = ("auto: `keep`-protected blocks are not candidates",)
        return BoundRule(rule, blocks=blocks, protected=kept, estimate=estimate(rule, (), blocks, self.graph),
                         warnings=warnings)

    def _check_auto_count(self, rule, candidates: list[int], n: int) -> None:
        problem = auto_count(rule, candidates, n)[1]
        if problem is not None:
            self._error(rule.auto.span, "out-of-range", *problem)

    def _bind_tokens(self, rule: A.Tokens, found) -> BoundRule:
        blocks = tuple(f for f in found if isinstance(f, Block))
        several = rule.action == "merge"  # one merge after each selected block
        if found and (len(blocks) != len(found) or not blocks or (len(blocks) > 1 and not several)):
            what = f"{len(found)} places" if len(found) != 1 else found[0].path
            need = "blocks" if several else "exactly one block"
            self._error(rule.selector.span, "selector", f"`tokens after … {rule.action}` needs {need}, and "
                        f"`{_sel(rule)}` selects {what}", "write e.g. `tokens after blocks[3]`")
        refusal = merge_refusal(self.captured) if rule.action == "merge" else None
        if refusal:
            self._error(rule.span, "unsupported", *refusal)
        last = self.graph.blocks[-1] if self.graph.blocks else None
        reads = rule.get("score") == "attention" if rule.action == "prune" else rule.get("by") == "keys"
        problem = token_attention_problem(self.captured, blocks, rule.action, reads)
        if problem and not refusal and last not in blocks:  # after the last block: said below, as such
            self._error(rule.span, "unsupported", *problem)
        if last is not None and last in blocks:
            first = min(b.index for b in blocks)
            # A slice only where it is not empty and the action takes several blocks.
            hint = (f"select blocks before the last, e.g. `blocks[{first}:-1]`" if several and first < last.index
                    else f"select the block before it, `blocks[{last.index - 1}]`, or an earlier one" if last.index
                    else "this model has one block: no place is left for it")
            self._error(rule.selector.span, "out-of-range", f"`tokens after {_sel(rule)}` includes the last block "
                        f"({last.path}): a {rule.action} there saves no work and only changes output tokens", hint)
        return BoundRule(rule, blocks=blocks, estimate=estimate(rule, (), blocks, self.graph))

    def _bind_linears(self, rule, found, protected: set[str]) -> BoundRule:
        if isinstance(rule, A.Precision) and rule.metric == "fisher" and (problem := lm_loss_problem(self.captured)):
            self._error(rule.span, "unsupported", "`by fisher` weighs each output by the gradient of a causal LM's "
                        f"next-token loss, and this model cannot give it: {problem}", "use `by output_mse`")
        elif isinstance(rule, A.Precision) and rule.metric == "fisher" and \
                (problem := no_gradients_problem(self.captured, self.token_line,
                                                 "`by fisher` weighs each output by a gradient")):
            self._error(rule.span, "unsupported", problem[0], problem[1] + ", or use `by output_mse`")
        # A block and a module inside it can both be selected (`blocks.*.**` on GPT-2 reaches
        # c_attn by its path and by its role): each target counts once, or it is rewritten twice.
        candidates = list({t.path: t for f in found for t in _targets_of(f, self.graph)}.values())
        linears = [t for t in candidates if t.kind == "linear"]
        others = sorted({t.kind for t in candidates if t.kind != "linear"})
        kept = [t for t in linears if t.path in protected]
        targets = tuple(t for t in linears if t.path not in protected)
        warnings = []
        if others and linears:
            warnings.append(f"skipped {len(candidates) - len(linears)} non-linear targets ({', '.join(others)}): "
                            f"`{rule.kind}` applies to linears; add `: Linear` to say so")
        if kept:
            warnings.append(f"{len(kept)} target{'s' * (len(kept) != 1)} protected by `keep`")
        if _globbed(rule.selector.path) and (direct := read_directly_note(self.graph, targets)) is not None:
            warnings.append(direct)
        paths = {t.path for t in targets}
        tied = [t for t in targets if t.tied and shared_outside(self.graph, t, paths)]
        if tied and not isinstance(rule, A.Adapt):
            warnings.append(f"{', '.join(n for t in tied for n in t.tied)}: {TIED_NOTE}")
        # no weight of its own (a bias may stay: the estimate took it for the weight, an IndexError)
        packed = [t for t in targets if not has_weight(t)]
        peft = [t for t in packed if "base_layer" in self.graph.modules[t.path].children]
        if peft:  # a PeftModel: the selected module is PEFT's wrapper, its weight is base_layer's
            self._error(rule.selector.span, "unsupported", f"`{rule.kind}` cannot rewrite {peft[0].path}: it is a "
                        f"PEFT adapter layer (its weight is {peft[0].path}.base_layer's)",
                        "merge the adapters into the model first (`peft_model.merge_and_unload()`), or compile the "
                        "base model and bring the adapters in with `adapt … from=DIR`")
            return BoundRule(rule, targets=(), warnings=tuple(warnings))
        if packed:  # a CompiledModel compiled again: its quantized linears hold packed codes, no weight
            more = f" and {len(packed) - 1} more" if len(packed) > 1 else ""
            self._error(rule.selector.span, "unsupported", f"`{rule.kind}` cannot rewrite {packed[0].path}{more}: "
                        "an earlier compile quantized it, and its packed weight is not a linear's weight",
                        "write this rule into the policy that quantized it (QLoRA: `quantize …` then `adapt …` "
                        "in one policy), or select linears that are not quantized")
            return BoundRule(rule, targets=(), warnings=tuple(warnings))
        if isinstance(rule, A.Adapt) and not rule.get("from"):
            self._check_rank(rule, targets)
        missing = adapter_directory(rule.get("from"))[1] if isinstance(rule, A.Adapt) and rule.get("from") else None
        if missing is not None:
            self._error(_param_span(rule, "from"), "no-file", *missing)
        # After an auto rule, which blocks `keep` protects is decided by its search: what the stand-in
        # shows protected may not be (compile refused a rule its binding after the search accepted).
        if found and not targets and kept and self.deferred:
            warnings.append(_MAYBE_KEPT)
        elif found and not targets:
            why = "all are protected by `keep`" if kept else f"it selects only {', '.join(others) or 'blocks'}"
            self._error(rule.selector.span, "selector", f"`{rule.kind}` acts on linear layers, and `{_sel(rule)}` "
                        f"leaves none: {why}", "select linears, e.g. `blocks.*.** : Linear` or `blocks.*.attn.q`")
        guess = estimate(rule, targets, (), self.graph, self.stored, rewritten=self.reformatted | self.earlier)
        if guess.infeasible:  # as compile would find it, before any weight is read
            self._error(rule.budget.span, "out-of-range", f"the budget {guess.note}",
                        "raise the limit or offer smaller formats")
        bound = BoundRule(rule, targets=targets, protected=tuple(t.path for t in kept),
                          estimate=guess, warnings=tuple(warnings))
        # not on a stand-in view after an auto rule: its blocks are not yet the ones the adapter was
        # saved from (the binding after the search checks it)
        if isinstance(rule, A.Adapt) and rule.get("from") and missing is None and targets and not self.deferred:
            self._check_adapter_directory(rule, bound)
        self.stored.update(stored_after(rule, targets, guess))
        formats = [rule.format] if isinstance(rule, A.Quantize) else \
            [c.format for c in rule.choices] if isinstance(rule, A.Precision) else []
        # a target some format leaves as it is (`keep`, its own half dtype) may stay a float weight
        self.reformatted |= {t.path for t in targets if formats
                             and not any(leaves_as_is(f, t, self.graph) for f in formats)}
        return bound

    def _check_adapter_directory(self, rule: A.Adapt, bound: BoundRule) -> None:
        """`from=DIR` read as the adapter pass reads it (its modules, method, ranks against the
        rule): `plan` said "ready" for what compile then refused."""
        try:
            check_adapter_directory(rule.get("from"), bound, self.source, self.filename)
        except SpecError as e:
            self.problems += e.diagnostics

    def _check_rank(self, rule: A.Adapt, targets: tuple[Target, ...]) -> None:
        """An adapter's B·A cannot have a larger rank than the layer's smaller dimension."""
        rank = rule.get("rank")
        small = [(t, min(t.shapes[t.params.index(p)])) for t in targets for p in t.params
                 if p.endswith(".weight") and len(t.shapes[t.params.index(p)]) == 2]
        over = [(t, m) for t, m in small if rank > m]
        if over:
            t, m = min(over, key=lambda o: o[1])
            self._error(_param_span(rule, "rank"), "out-of-range", f"rank={rank} is larger than {t.path}'s "
                        f"smaller dimension ({m}){f' and {len(over) - 1} more targets' if len(over) > 1 else ''}: B·A "
                        f"cannot have rank above {m}", f"use rank={m} or less, or narrow the selector")

    def _check_overlaps(self, bound: list[BoundRule]) -> None:
        """One linear given two precisions, or an adapter merged into already-quantized weights;
        then the token steps (token_step_checks.token_step_order)."""
        quantized: dict[str, BoundRule] = {}
        adapted: dict[str, BoundRule] = {}  # targets with an unmerged adapter
        for problem in token_step_order([b for b in bound if isinstance(b.rule, A.Tokens) and b.blocks]):
            self._error(*problem)
        for b in bound:
            if isinstance(b.rule, A.Adapt):
                clash = next((t.path for t in b.targets if t.path in adapted), None)
                if clash is not None:
                    self._error(b.rule.span, "duplicate", f"{clash} already has an adapter from line "
                                f"{adapted[clash].line} (`{adapted[clash].text}`): a linear takes one adapter",
                                "narrow one selector, or give the earlier rule merge=true to fold it in first")
                if not b.rule.get("merge"):
                    adapted.update({t.path: b for t in b.targets})
            if isinstance(b.rule, (A.Quantize, A.Precision)):
                clash = next((quantized[t.path] for t in b.targets if t.path in quantized), None)
                if clash is not None:
                    path = next(t.path for t in b.targets if t.path in quantized)
                    self._error(b.rule.span, "duplicate", f"{path} is given a precision here and by line "
                                f"{clash.line} (`{clash.text}`)", "narrow one selector, or add `keep` for the exceptions")
                quantized.update({t.path: b for t in b.targets})
            elif isinstance(b.rule, A.Adapt) and b.rule.get("merge"):
                clash = next((quantized[t.path] for t in b.targets if t.path in quantized), None)
                if clash is not None:
                    self._error(b.rule.span, "illegal-order", f"`adapt … merge=true` merges into weights that line "
                                f"{clash.line} already quantized", f"move this rule above line {clash.line}, "
                                "or use `merge=false` (QLoRA style)")

    def _error(self, span: A.Span, kind: str, message: str, hint: str | None = None) -> None:
        width = max(1, span.end_column - span.column) if span.end_line == span.line else 1
        self.problems.append(Diagnostic(kind, message, span.line, span.column, width, hint))


def _globbed(path: A.Path) -> bool:
    """Does the selector reach everything under a place (`**`)? Said of `blocks.*.attn.q`, the
    note on weights it cannot reach would be noise: the user named what they wanted."""
    return any(isinstance(s, A.GlobStar) or isinstance(s, A.Alternatives) and any(map(_globbed, s.options))
               for s in path.segments)


def _sel(rule) -> str:
    from ..dsl.printer import format_selector

    return format_selector(rule.selector)


def _targets_of(found: Target | Block, graph: ModelGraph) -> list[Target]:
    if isinstance(found, Target):
        return [found]
    return [graph.targets[p] for p in found.targets if p in graph.targets]


def _paths_of(found: Target | Block, graph: ModelGraph) -> set[str]:
    return {found.path} | {t.path for t in _targets_of(found, graph)}


def _param_span(rule: A.Rule, name: str) -> A.Span:
    """Where the rule writes `name=…` (the caret goes there), or the rule when it is a default."""
    return next((p.span for p in rule.params if p.name == name), rule.span)
